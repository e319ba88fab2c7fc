"""kiln's custom operators. Importing this package registers them with torch.library."""

from kiln.kernels import (  # noqa: F401  (registration side effects)
    attention_site,
    linear,
    paged_attention,
    paged_attention_limits,  # noqa: F401
    span_attention,
)
