"""Compiled kernels: ``pointwise`` (math written once for both targets), ``cpu`` (@njit) and ``cuda`` (@cuda.jit).

The shared vocabulary: ``dense_forward``, ``dense_backward_params``, ``dense_backward_input``,
``dense_backward``, ``loss_grad``, ``output_transform``, ``sgd_update``, ``adam_update`` and ``gather_rows``
have the same names and signatures (outputs first) in ``cpu`` and ``cuda``. Beyond it each module has what
its target needs: ``cpu`` the transposed-operand and feature-major kernels and the whole-step drivers that
run many epochs in one compiled call; ``cuda`` the launches the CPU does inline (``sum_into``, ``add_into``,
``array_stats``).

Activations, their derivatives, the optimizer element updates and the row form of the fused loss-gradient
are written once, in ``pointwise``, and inlined by both targets; the CPU's ``loss_grad`` spells the same
arithmetic out over a whole (B, k) block for mse and softmax cross-entropy (see its docstring for why).
"""
