"""Small helpers shared by several test files."""

from embq.embedding.formats import TableFormat
from embq.embedding.registry import format_names, get_format
from embq.errors import EmbqError


def codebook_format(dim: int) -> str | None:
    """A format with table-level params (it overrides TableFormat.fit) that stores rows of
    `dim`, if embq has one."""
    for name in format_names():
        fmt = get_format(name)
        try:
            fmt.check_dim(dim)
        except EmbqError:
            continue
        if type(fmt).fit is not TableFormat.fit:
            return name
    return None
