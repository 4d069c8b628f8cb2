"""`python -m latentforge.demo SCENES_DIR URLS_OUT [--port P]`: serve the demo's scenes again (see README)."""

from latentforge.demo.server import main

raise SystemExit(main())
