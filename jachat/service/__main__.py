from jachat.service.cli import main

raise SystemExit(main())
