"""The capture: one forward pass of the model itself, each requested layer's
output recorded as the layer produces it, then one backward pass.

* `recorder`: the recorders of layer calls (`LayerCall`), one per strategy;
* `assembly`: the entries of the captured sources, in forward order, and the
  `Gradients` built from a run, shared by every strategy;
* `tape`: the tape strategy (TensorFlow), and its compiled form;
* `functional` (with `functional_steps`, `functional_per_example`): the
  functional strategy (JAX, PyTorch), the forward pass as a function of its
  sources;
* `per_example`: which per-example method is correct for a request, and
  TensorFlow's two methods.
"""
