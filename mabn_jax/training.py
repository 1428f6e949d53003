"""Training with MABN: the one-call gradient, and the probe layer underneath it.

MABN's gradient needs this step's backward statistics (Ψ_B, g_B), which exist
only inside the backward pass. :func:`value_and_grad` handles that: it is
``jax.value_and_grad`` plus three things, the way Flax's ``Module.perturb``
works (zero variables, differentiated):

1. it adds a zero *probe* per MABN layer to the differentiated ``params``
   (shaped like the layer's windows, so ghost batches need nothing extra),
   and hands a second zero set to the layers directly, which a
   ``stop_gradient`` or cast of the params in ``fun`` cannot cut (a layer
   inside a transform of ``fun``, e.g. ``nn.scan``, reads the params' copy);
2. differentiates w.r.t. them too (their gradient holds Ψ_B and g_B) and
   drops them from the returned gradient;
3. writes them into the updated ``batch_stats`` that ``fun`` returns in its
   aux output, with a step whose statistics are not finite undone.

The low-level layer underneath is public: :func:`init_probes` (zero probes
for the ``'mabn_probes'`` collection) and :func:`record_backward_stats`.
"""

from mabn_jax._linen_probes import init_probes, record_backward_stats, without_probes
from mabn_jax._linen_training import value_and_grad

__all__ = ["value_and_grad", "init_probes", "record_backward_stats", "without_probes"]
