from clipq.cli import main

raise SystemExit(main())
