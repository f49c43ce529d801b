from jachat.converter.cli import main

raise SystemExit(main())
