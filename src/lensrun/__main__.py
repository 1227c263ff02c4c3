from lensrun.cli import main

raise SystemExit(main())
