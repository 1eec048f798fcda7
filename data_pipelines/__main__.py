from data_pipelines.cli import main

raise SystemExit(main())
