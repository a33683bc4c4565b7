from traced_run.commands.cli import main

raise SystemExit(main())
