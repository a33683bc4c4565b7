from traced_run.cli import main

raise SystemExit(main())
