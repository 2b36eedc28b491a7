"""A small network's whole fit in ONE launch: one block loops over epochs and steps.

For networks whose layers are narrow (W1 = 1-16-1, W2 = 64-128-10) a training step is a few microseconds
of arithmetic and a chain of launches would cost more than the work (numba-cuda's host cost is about
20 us a launch). Here one block runs every epoch of a train_epochs call: forward, the fused
loss-gradient (pointwise.loss_grad_row, as everywhere), backward and the optimizer update, the epoch loss
summed in float64, and the stopping rules (a non-finite epoch restores the epoch's start and stops; an
epoch at or below the target loss stops) applied on the device. The per-step rows and scalars are the
same tables cuda_step's launches read (its ArenaLayout), so the two paths agree step for step.

A block's rows are staged in (dynamic) shared memory, a chunk of at most ``chunk`` rows at a time (a
batch larger than a chunk accumulates its gradient over chunks, in chunk order): activations and deltas of
every layer, and the chunk's row losses. Parameters, optimizer state and gradients are copied into shared
memory as well when they fit beside the chunk (W1: everything, 16 KB), else they stay in global memory,
where L1 and L2 hold them (W2: 9610 parameters).

One block and no grid synchronisation, so it runs exactly in numba's simulator; the price is that a
large network would leave all but one multiprocessor idle, so ``fused_plan`` accepts only narrow ones.
"""
from __future__ import annotations

import math

import numpy as np

from . import cuda as base
from .cuda import activate, activation_grad, cuda, loss_grad_row, nbtypes, strict_kernel
from .cuda_step import (
    C_EPOCHS_RUN,
    C_F_SCHED,
    C_I_JOBS,
    C_I_STEPS,
    C_LOSS,
    C_P,
    C_STOP,
    D_DIVISOR,
    D_LOSSES,
    D_TARGET,
    N_STEP_F,
    N_STEP_I,
    S_ORDER,
    S_ROWS,
    S_START,
    SF_INV,
    STOP_NONFINITE,
    STOP_TARGET,
    optimizer_update,
)

FUSED_THREADS = 256  # threads of the one block (patchable by tests, before the first launch)
FUSED_MAX_WIDTH = 128  # every layer at most this wide ...
FUSED_MAX_PARAMS = 1 << 16  # ... and at most this many parameters (one multiprocessor's worth of work)
SHARED_BYTES = 48 * 1024 - 256  # dynamic shared memory available without an opt-in (and a little static)

# The fused job row (in the job table, see cuda_step): where the network is described in I, the chunk, etc.
FZ_NET, FZ_CHUNK, FZ_UNITS, FZ_STAGED, FZ_EPOCHS, FZ_STEPS = range(6)


def fused_plan(layout, capacity: int, dtype):
    """(chunk rows, staged, shared bytes) for the fused fit of ``layout`` with batches of ``capacity`` rows,
    or None when the network is too wide or large for one block (see FUSED_MAX_WIDTH, FUSED_MAX_PARAMS)."""
    if int(max(layout.sizes)) > FUSED_MAX_WIDTH or layout.n_params > FUSED_MAX_PARAMS:
        return None
    item = np.dtype(dtype).itemsize
    units = int(layout.unit_offsets[-1])
    per_row = item * (2 * units + 1)
    state = item * 4 * layout.n_params
    if capacity * per_row + state <= SHARED_BYTES:
        return capacity, True, capacity * per_row + state
    chunk = min(capacity, SHARED_BYTES // per_row)
    if chunk < 1:
        return None
    return chunk, False, chunk * per_row


def network_words(layout, act_codes) -> np.ndarray:
    """I words describing the network for the fused kernel: [L, sizes (L+1), act codes (L), param offsets (L)]."""
    L = layout.n_layers
    return np.concatenate(([L], layout.sizes, np.asarray(act_codes, np.int64)[:L], layout.param_offsets)).astype(
        np.int64)


def fused_fit_kernel():
    T = FUSED_THREADS

    def build():
        @strict_kernel
        def _fused_fit_kernel(F, D, I, X, Y):
            # F, I: the arenas of cuda_step (F[0:4P] parameters, optimizer state, gradients; F[4P:7P] the epoch
            # backup; per-step rows and scalars); D (float64): target, divisor, epoch losses. X (n * n_in,),
            # Y (n * k,) the data set. ONE block of T threads; dynamic shared memory holds a chunk's activations
            # and deltas (chunk * units each), its row losses (chunk,) and, when staged, a copy of F[0:4P].
            smem = cuda.shared.array(0, dtype=F.dtype)
            flag = cuda.shared.array(1, dtype=nbtypes.int64)
            t = cuda.threadIdx.x
            jb = I[C_I_JOBS]
            net = I[jb + FZ_NET]
            L = I[net]
            P = I[C_P]
            chunk = I[jb + FZ_CHUNK]
            units = I[jb + FZ_UNITS]
            staged = I[jb + FZ_STAGED] != 0
            n_in0 = I[net + 1]
            k = I[net + 1 + L]
            acts = 0
            deltas = chunk * units
            row_losses = 2 * chunk * units
            if staged:
                state = smem[row_losses + chunk:row_losses + chunk + 4 * P]
                for i in range(t, 3 * P, T):
                    state[i] = F[i]
            else:
                state = F[0:4 * P]
            zero = F.dtype.type(0.0)
            one = F.dtype.type(1.0)
            total = np.float64(0.0)
            per_epoch = I[jb + FZ_STEPS]
            for epoch in range(I[jb + FZ_EPOCHS]):
                for i in range(t, 3 * P, T):
                    F[4 * P + i] = state[i]
                total = np.float64(0.0)
                for b in range(per_epoch):
                    s = epoch * per_epoch + b
                    st = I[C_I_STEPS] + s * N_STEP_I
                    start = I[st + S_START]
                    rows = I[st + S_ROWS]
                    order = I[st + S_ORDER]
                    inv = F[I[C_F_SCHED] + s * N_STEP_F + SF_INV]
                    for c0 in range(0, rows, chunk):
                        n_rows = min(chunk, rows - c0)
                        # The chunk's inputs, gathered through the epoch's order, into slot 0.
                        for e in range(t, n_rows * n_in0, T):
                            r = e // n_in0
                            q = e % n_in0
                            row = start + c0 + r if order < 0 else I[order + start + c0 + r]
                            smem[acts + r * n_in0 + q] = X[row * n_in0 + q]
                        cuda.syncthreads()
                        # Forward: slot l + 1 = act(slot l @ W_l + b_l); consecutive threads take consecutive
                        # outputs of a row (coalesced reads of W's rows).
                        a_off = acts
                        for l in range(L):
                            n_in = I[net + 1 + l]
                            n_out = I[net + 2 + l]
                            w = I[net + 2 + 2 * L + l]
                            o_off = a_off + chunk * n_in
                            for e in range(t, n_rows * n_out, T):
                                r = e // n_out
                                j = e % n_out
                                acc = zero
                                for q in range(n_in):
                                    acc += smem[a_off + r * n_in + q] * state[w + q * n_out + j]
                                smem[o_off + r * n_out + j] = activate(acc + state[w + n_in * n_out + j],
                                                                       I[net + 2 + L + l])
                            cuda.syncthreads()
                            a_off = o_off
                        # Fused loss-gradient per row: dlogits into the deltas' last slot.
                        d_last = deltas + (a_off - acts)
                        for r in range(t, n_rows, T):
                            row = start + c0 + r if order < 0 else I[order + start + c0 + r]
                            smem[row_losses + r] = loss_grad_row(smem[d_last + r * k:d_last + (r + 1) * k],
                                                                 smem[a_off + r * k:a_off + (r + 1) * k],
                                                                 Y[row * k:(row + 1) * k], I[C_LOSS], inv)
                        cuda.syncthreads()
                        if t == 0:  # the CPU's order: row by row, batch by batch, in float64
                            for r in range(n_rows):
                                total += np.float64(smem[row_losses + r])
                        # Backward, last layer first: the weight gradient (bias as the row of ones, accumulated
                        # over the batch's chunks in order), then the input gradient (reads W_l, updated only
                        # after the whole batch).
                        for l in range(L - 1, -1, -1):
                            n_in = I[net + 1 + l]
                            n_out = I[net + 2 + l]
                            w = I[net + 2 + 2 * L + l]
                            a_l = a_off - chunk * n_in
                            d_out = deltas + (a_off - acts)
                            for e in range(t, (n_in + 1) * n_out, T):
                                q = e // n_out
                                j = e % n_out
                                acc = zero
                                if q < n_in:
                                    for r in range(n_rows):
                                        acc += smem[a_l + r * n_in + q] * smem[d_out + r * n_out + j]
                                else:
                                    for r in range(n_rows):
                                        acc += one * smem[d_out + r * n_out + j]
                                g = 3 * P + w + q * n_out + j
                                if c0 == 0:
                                    state[g] = acc
                                else:
                                    state[g] += acc
                            if l > 0:
                                d_in = deltas + (a_l - acts)
                                for e in range(t, n_rows * n_in, T):
                                    r = e // n_in
                                    q = e % n_in
                                    acc = zero
                                    for j in range(n_out):
                                        acc += smem[d_out + r * n_out + j] * state[w + q * n_out + j]
                                    smem[d_in + r * n_in + q] = acc * activation_grad(smem[a_l + r * n_in + q],
                                                                                     I[net + 1 + L + l])
                            cuda.syncthreads()
                            a_off = a_l
                    for p in range(t, P, T):
                        optimizer_update(state, F, I, p, s)
                    cuda.syncthreads()
                if t == 0:
                    loss = total / D[D_DIVISOR]
                    D[D_LOSSES + epoch] = loss
                    I[C_EPOCHS_RUN] = epoch + 1
                    flag[0] = 0
                    if math.isnan(loss) or math.isinf(loss):  # compiled without fast-math: kept as written
                        flag[0] = STOP_NONFINITE
                    elif loss <= D[D_TARGET]:
                        flag[0] = STOP_TARGET
                    I[C_STOP] = flag[0]
                cuda.syncthreads()
                if flag[0] == STOP_NONFINITE:
                    for i in range(t, 3 * P, T):
                        state[i] = F[4 * P + i]
                    cuda.syncthreads()
                if flag[0] != 0:
                    break
            if staged:
                cuda.syncthreads()
                for i in range(t, 3 * P, T):
                    F[i] = state[i]
        return _fused_fit_kernel

    return base._cached(("fused_fit", T), build)


def kernel_signatures(f):
    v = f[::1]
    return {"fused_fit": (fused_fit_kernel(), (v, nbtypes.float64[::1], nbtypes.int64[::1], v, v))}
