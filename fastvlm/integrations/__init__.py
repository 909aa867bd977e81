"""Bridges to other serving engines; each lives in its own subpackage and imports its engine lazily."""
