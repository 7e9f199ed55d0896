from hdfunc.cli import main

raise SystemExit(main())
