"""LatentForge tests (a package, so `tests.harness` wins over any site-packages `tests`)."""
