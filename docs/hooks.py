"""mkdocs hooks (mkdocs.yml: hooks) and a griffe extension (mkdocstrings: extensions) for the
documentation site. Not part of the site (exclude_docs)."""

import re

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def on_page_markdown(markdown, page, config, files):
    """Render the Markdown inside ``<details>`` blocks (the full table of the verification report),
    which Python-Markdown otherwise passes through as raw text; GitHub renders it either way."""
    return re.sub(r"^<details>", '<details markdown="1">', markdown, flags=re.M)


class SphinxRoles(Extension):
    """Docstrings name objects with Sphinx roles (``:func:`partition```); render them as code."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
