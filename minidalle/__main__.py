from minidalle.cli import main

raise SystemExit(main())
