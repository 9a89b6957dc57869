"""Attribution methods, one module per method, over the shared batched-gradient
utility and the `Attribution` result in `_common`."""
