"""pytest plugin for plugin authors (see CONTRIBUTING.md)."""
