from jachat.bench.cli import main

raise SystemExit(main())
