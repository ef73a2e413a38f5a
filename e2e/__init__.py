"""End-to-end journeys in Chromium (pytest-playwright, sync API). See e2e/README.md."""
