"""Pipeline modules used as fixtures: importable, so their steps pickle by reference."""
