"""kiln's custom operators. Importing this package registers them with torch.library."""

from kiln.kernels import attention_site, paged_attention  # noqa: F401  (registration side effects)
