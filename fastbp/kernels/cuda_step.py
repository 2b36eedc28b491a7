"""A training step in at most L + 2 launches, over flat buffers, identical from step to step.

Every kernel here takes the same few arrays: ``F`` (the float arena: parameters, optimizer state,
gradients, epoch backup, per-step scalars, activations, deltas, row losses, split-K partials), ``I`` (the
int64 arena: control words, per-step rows, sample orders, the job table, split-K counters), the data set's
``X`` and ``Y`` flattened (used in place: the gather of a mini-batch is fused into the loads that read
them), and ``D`` (float64: the epoch losses). Integer offsets in ``I`` say where everything is
(``ArenaLayout``): numba-cuda's host cost grows with every array argument (each expands to 5 + 2 ndim
kernel parameters), and a launch whose arguments never change can be replayed from a CUDA graph.

Everything that changes from one step to the next is read from device memory: the step counter
``I[C_STEP]`` (advanced by the last block of a step's last launch) indexes the per-step rows
(start, count, order) and scalars (learning rate, Adam's bias corrections, the loss divisor) that the host
computes once per call; ``I[C_STOP]`` makes every later launch of the call return at once after an epoch
that hit the target loss or went non-finite. So one epoch's launches are the same every epoch and can be
captured once (``fastbp.kernels.cuda.Graph``).

The launches of one step of an L-layer network (``step_launches``):
    F_0 .. F_{L-2}  forward of the hidden layers (F_0 reads its rows of X through the epoch's order)
    T               the last layer forward + fused loss-gradient (pointwise.loss_grad_row) + the input
                    gradient of the last layer (rows are independent: a block owns a few batch rows)
    B_l, l = L-2..1 input gradient of layer l (reads W_l) + weight gradient and update of layer l + 1
                    (W_{l+1} is read by nothing later in the step)
    U               weight gradients and updates of layers 1 and 0; its last block advances the step
that is 2L - 1 launches (L + 2 or fewer for L <= 3; 2 for L = 1). The input gradient of layer l reads W_l,
so W_l's update waits for the next launch: a weight gradient never shares a launch with the input
gradient that reads the same weight. Per epoch two more: ``_epoch_begin_kernel`` (backup, or the restore
after a non-finite epoch) and ``_epoch_end_kernel`` (the epoch loss summed in float64, the stopping rules).

The products are the register-tiled ones of ``fastbp.kernels.cuda`` (``tile_product``) with a job table:
a launch holds one or more jobs (a layer's product in one of three forms), each a range of blocks; a job
whose output grid is small splits its summed axis (split-K) over several blocks, and the last of them to
finish (an atomic counter per tile: an integer, never a float, so the sums stay deterministic) adds the
partial tiles in split order and applies the epilogue.
"""
from __future__ import annotations

import math

import numpy as np

from . import cuda as base
from .cuda import (
    BACKWARD_INPUT,
    BACKWARD_PARAMS,
    FORWARD,
    activate,
    activation_grad,
    adam_update_one,
    cuda,
    device_inline,
    kernel,
    loss_grad_row,
    nbtypes,
    output_transform_row,
    sgd_update_one,
    strict_kernel,
    tile_code,
    tile_shapes,
)
from .pointwise import (
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    SGD,
    adam_decay_terms,
)

# --- launch settings (patchable by tests, before the first launch) -----------------------------------------
TAIL_ROWS = 16  # batch rows per block of the tail kernel
TAIL_THREADS = 128
EPOCH_THREADS = 256  # _epoch_begin_kernel and the update kernel: threads per block
REDUCE_THREADS = 256  # _epoch_end_kernel / _loss_sum_kernel: one block, a power of two
# Output grids with fewer 64 x 64 tiles than this use 32 x 32 tiles ("r4s"), and split their summed axis
# over up to MAX_SPLITS blocks while a job has fewer than SPLIT_TARGET tiles (W3 at batch 128: the first
# layer's 128 x 256 output is 8 tiles of 64 x 64; 32 tiles of 32 x 32 split 4 ways over its 784 inputs).
LARGE_GRID_TILES = 128
SPLIT_TARGET = 64
MAX_SPLITS = 8
MIN_SPLIT_STEPS = 4  # a split covers at least this many k steps of the tile

# --- control words I[0:N_CTRL] --------------------------------------------------------------------------------
C_STEP = 0  # step index within the call (advanced by the last block of each step's last launch)
C_STOP = 1  # 0 while training; STOP_TARGET / STOP_NONFINITE after the epoch that triggered the rule
C_EPOCH = 2  # epoch index within the call
C_EPOCHS_RUN = 3  # epochs whose loss was recorded
C_DONE = 4  # blocks of the current advancing launch that have finished
C_P = 5  # number of parameters P
C_N = 6  # samples per epoch
C_OPTIMIZER = 7  # pointwise.SGD / ADAM / ADAMW
C_NESTEROV = 8
C_LOSS = 9
C_I_STEPS = 10  # offset of the per-step rows table in I
C_I_JOBS = 11  # offset of the job table in I
C_F_SCHED = 12  # offset of the per-step scalars in F
C_F_ROWS = 13  # offset of the epoch's row losses in F
C_F_HYPER = 14  # offset of the optimizer's hyper-parameters in F
C_F_WEIGHTS = 15  # offset in F of the data set's sample weights (n,), or -1: every row weighs 1
N_CTRL = 16
STOP_TARGET = 1
STOP_NONFINITE = 2

# Per-step rows I[C_I_STEPS + s * N_STEP_I + ...]: the batch's first row, its row count, the offset in I of
# the epoch's sample order (-1: in order), and 1 for the very first update (torch's momentum initialisation).
S_START, S_ROWS, S_ORDER, S_FIRST = range(4)
N_STEP_I = 4
# Per-step scalars F[C_F_SCHED + s * N_STEP_F + ...]: learning rate, Adam's lr / (1 - beta1^t) and
# sqrt(1 - beta2^t) (float64 on the host, then cast, as the CPU does), 1 / loss divisor of the batch (with
# sample weights: 1 / (the batch's weight sum * one row's divisor), 0 for a batch that weighs nothing), and
# the L2 term and decoupled decay factor of pointwise.adam_decay_terms (Adam: wd, 1; AdamW: 0, 1 - lr wd).
SF_LR, SF_STEP_SIZE, SF_SQRT_BC2, SF_INV, SF_L2, SF_DECAY = range(6)
N_STEP_F = 6
# Hyper-parameters F[C_F_HYPER + ...] (in the model's dtype).
HF_MOMENTUM, HF_DAMPENING, HF_WEIGHT_DECAY, HF_BETA1, HF_BETA2, HF_EPS = range(6)
N_HYPER_F = 6
# The float64 arena D.
D_TARGET = 0  # the target loss (-inf: none)
D_DIVISOR = 1  # the epoch's loss divisor
D_EVAL = 2  # a loss sum computed outside training
D_LOSSES = 4  # the epoch losses of the call follow

# --- the job table: I[C_I_JOBS + j * N_JOB + ...] ---------------------------------------------------------------
(J_FORM, J_M, J_N, J_K, J_BATCH_AXIS, J_DYNAMIC, J_START, J_ROWS, J_ORDER,
 J_A_X, J_A_OFF, J_A_SI, J_A_SK, J_A_ONES, J_B_OFF, J_B_SJ, J_B_SK, J_C_OFF, J_C_LD, J_E_OFF, J_E_LD, J_ACT,
 J_TILES_N, J_TILES, J_BLOCK0, J_SPLITS, J_KSPLIT, J_SCRATCH, J_COUNTER, J_MODE, J_P_OFF, J_INV) = range(32)
N_JOB = 32
# J_BATCH_AXIS: which size is the batch's row count (the last batch of an epoch is shorter): the output rows
# M (forward, input gradient), the summed axis K (weight gradient), or none.
AXIS_NONE, AXIS_M, AXIS_K = range(3)
# J_MODE of a weight-gradient job: bit 1 adds to the gradient buffer instead of overwriting it (chunks of a
# data set), bit 2 applies the optimizer update to the parameters right after (training).
MODE_ACCUMULATE = 1
MODE_UPDATE = 2
# Tail job fields: the same rows, with J_DYNAMIC, J_START, J_ROWS, J_ORDER and J_INV as above and these in
# the fields a product job uses for its operands (see build_plan's tail()).
(T_MODE, T_KIN, T_K, T_A_X, T_A_OFF, T_W_OFF, T_B_OFF, T_LOGITS, T_DLOGITS, T_DZ, T_PREV_ACT, T_ROWS_OFF,
 T_INPUT_GRAD) = range(J_ORDER + 1, J_ORDER + 14)
TAIL_TRAIN = 0  # loss, dlogits and (with T_INPUT_GRAD) the last layer's input gradient
TAIL_PREDICT = 2  # the loss's output transform of the logits, into the dlogits slot


def _zeros_table(n_jobs: int) -> np.ndarray:
    return np.zeros((n_jobs, N_JOB), dtype=np.int64)


@device_inline
def batch_rows(I, base_row):
    # (first row, row count, order offset or -1) of the rows a job works on: the current step's batch
    # (dynamic jobs, training) or the job's own static rows (evaluation chunks).
    if I[base_row + J_DYNAMIC] != 0:
        st = I[C_I_STEPS] + I[C_STEP] * N_STEP_I
        return I[st + S_START], I[st + S_ROWS], I[st + S_ORDER]
    return I[base_row + J_START], I[base_row + J_ROWS], I[base_row + J_ORDER]


@device_inline
def step_scalar(F, I, index):
    return F[I[C_F_SCHED] + I[C_STEP] * N_STEP_F + index]


@device_inline
def optimizer_update(state, F, I, p, s):
    # The optimizer update of parameter p with step s's scalars (pointwise's update rules, the same source the
    # CPU inlines). state (4P,): parameters, the two optimizer-state rows, gradients (F itself, or the fused
    # kernel's copy in shared memory); F holds the hyper-parameters and per-step scalars.
    P = I[C_P]
    params = state[0:P]
    state0 = state[P:2 * P]
    state1 = state[2 * P:3 * P]
    grads = state[3 * P:4 * P]
    h = I[C_F_HYPER]
    sched = I[C_F_SCHED] + s * N_STEP_F
    lr = F[sched + SF_LR]
    if I[C_OPTIMIZER] != SGD:
        adam_update_one(params, state0, state1, grads, p, lr, F[h + HF_BETA1], F[h + HF_BETA2], F[h + HF_EPS],
                        F[sched + SF_L2], F[sched + SF_STEP_SIZE], F[sched + SF_SQRT_BC2], F[sched + SF_DECAY])
    else:
        first = I[I[C_I_STEPS] + s * N_STEP_I + S_FIRST]
        sgd_update_one(params, state0, grads, p, lr, F[h + HF_MOMENTUM], F[h + HF_DAMPENING], F[h + HF_WEIGHT_DECAY],
                       I[C_NESTEROV] != 0, first != 0)


@device_inline
def product_epilogue(F, I, jb, form, i, j, v):
    # Output element (i, j) of job jb from its summed value v: the forward's bias and activation, the input
    # gradient's activation derivative, or the weight gradient (+ optimizer update).
    c = I[jb + J_C_OFF] + i * I[jb + J_C_LD] + j
    if form == FORWARD:
        F[c] = activate(v + F[I[jb + J_E_OFF] + j], I[jb + J_ACT])
    elif form == BACKWARD_INPUT:
        F[c] = v * activation_grad(F[I[jb + J_E_OFF] + i * I[jb + J_E_LD] + j], I[jb + J_ACT])
    else:
        mode = I[jb + J_MODE]
        if mode & MODE_ACCUMULATE:
            F[c] += v
        else:
            F[c] = v
        if mode & MODE_UPDATE:
            optimizer_update(F, F, I, I[jb + J_P_OFF] + i * I[jb + J_C_LD] + j, I[C_STEP])


@device_inline
def finish_launch(I, t):
    # Called by every block of a step's last launch, after its work: the last block to arrive advances the
    # step counter, after every block has read it (integer atomics only: no effect on the float results).
    cuda.syncthreads()
    if t == 0:
        cuda.threadfence()
        if cuda.atomic.add(I, C_DONE, 1) == cuda.gridDim.x - 1:
            I[C_DONE] = 0
            I[C_STEP] += 1


def step_product_kernel(config: str, dtype=np.float32):
    """The job-table product for configuration ``config`` (see kernels.cuda.PRODUCT_CONFIGS) and ``dtype``."""
    BM, BN, _, TM, TN, T, _ = tile_shapes(config)
    code = tile_code(config)
    SMEM = code["SMEM"]
    TILE = BM * BN
    tile_product = code["tile_product"]

    def build():
        @base.product_jit(config, dtype)
        def _step_product_kernel(F, I, X, job0, n_jobs, advance):
            # F (float arena), I (int64 arena, see ArenaLayout), X (n * n_in,) the data set's inputs. Jobs
            # job0 .. job0 + n_jobs - 1 of the table, each a range of blocks (J_BLOCK0 ascending); block b of a
            # job with S splits works on tile b // S, split b % S: C[i0:i0+BM, j0:j0+BN] of its product.
            smem = cuda.shared.array(SMEM, dtype=F.dtype)
            last = cuda.shared.array(1, dtype=nbtypes.int64)
            acc = cuda.local.array((TM, TN), dtype=F.dtype)
            if I[C_STOP] != 0:
                return
            t = cuda.threadIdx.x
            b = cuda.blockIdx.x
            jobs = I[C_I_JOBS]
            jb = jobs + job0 * N_JOB
            for q in range(job0 + 1, job0 + n_jobs):
                if I[jobs + q * N_JOB + J_BLOCK0] <= b:
                    jb = jobs + q * N_JOB
            local = b - I[jb + J_BLOCK0]
            splits = I[jb + J_SPLITS]
            tile = local // splits
            split = local % splits
            i0 = (tile // I[jb + J_TILES_N]) * BM
            j0 = (tile % I[jb + J_TILES_N]) * BN
            form = I[jb + J_FORM]
            start, rows, order_off = batch_rows(I, jb)
            M = I[jb + J_M]
            N = I[jb + J_N]
            K = I[jb + J_K]
            axis = I[jb + J_BATCH_AXIS]
            if axis == AXIS_M:
                M = rows
            elif axis == AXIS_K:
                K = rows
            a_ones = I[jb + J_A_ONES]
            m_rows = M + 1 if a_ones >= 0 else M
            a_off = I[jb + J_A_OFF]
            a_si = I[jb + J_A_SI]
            a_sk = I[jb + J_A_SK]
            gather = 0
            if I[jb + J_A_X] != 0:  # the batch's rows of X: through the epoch's order, or contiguous from start
                if order_off < 0:
                    a_off += start * (a_si if axis == AXIS_M else a_sk)
                else:
                    gather = 1 if axis == AXIS_M else 2
                    order_off += start
            src = X if I[jb + J_A_X] != 0 else F
            if i0 < m_rows:  # tiles past a short batch's rows have nothing to do (uniform per block)
                k_begin = split * I[jb + J_KSPLIT]
                k_end = min(K, k_begin + I[jb + J_KSPLIT])
                tile_product(acc, smem, t, i0, j0, k_begin, k_end, M, N, src, a_off, a_si, a_sk, gather, a_ones,
                             F, I[jb + J_B_OFF], I[jb + J_B_SJ], I[jb + J_B_SK], I, order_off)
                if splits == 1:
                    for e in range(t, TILE, T):
                        i = i0 + e // BN
                        j = j0 + e % BN
                        if i < m_rows and j < N:
                            product_epilogue(F, I, jb, form, i, j, smem[e])
                else:
                    # The partial tile to scratch; the last split of the tile to finish adds all of them in split
                    # order (the same sum whichever block is last) and applies the epilogue.
                    first = I[jb + J_SCRATCH] + tile * splits * TILE
                    for e in range(t, TILE, T):
                        F[first + split * TILE + e] = smem[e]
                    cuda.threadfence()
                    cuda.syncthreads()
                    if t == 0:
                        last[0] = cuda.atomic.add(I, I[jb + J_COUNTER] + tile, 1) == splits - 1
                    cuda.syncthreads()
                    if last[0] != 0:
                        cuda.threadfence()
                        for e in range(t, TILE, T):
                            i = i0 + e // BN
                            j = j0 + e % BN
                            if i < m_rows and j < N:
                                v = F[first + e]
                                for s in range(1, splits):
                                    v += F[first + s * TILE + e]
                                product_epilogue(F, I, jb, form, i, j, v)
                        if t == 0:
                            I[I[jb + J_COUNTER] + tile] = 0
            if advance != 0:
                finish_launch(I, t)
        return _step_product_kernel

    return base._cached(("step_product", base.PRODUCT_CONFIGS[config], np.dtype(dtype).name), build)


def tail_kernel():
    R = TAIL_ROWS
    T = TAIL_THREADS

    def build():
        @strict_kernel
        def _tail_kernel(F, I, X, Y, job):
            # The last layer of rows [b R, (b+1) R) of the batch: logits (rows, k) = A (rows, n_in) @ W + bias
            # (A: the previous layer's output in F, or the batch's rows of X (n * n_in,)); then per row the
            # fused loss-gradient (pointwise.loss_grad_row) against the row's targets in Y (n * k,), its loss
            # into the epoch's row losses (both scaled by the row's sample weight when I[C_F_WEIGHTS] >= 0); then
            # the input gradient dZ (rows, n_in) = (dlogits @ W.T) * act'(A).
            # TAIL_PREDICT writes the output transform of the logits instead. Block-local: rows need no other
            # block's rows.
            if I[C_STOP] != 0:
                return
            t = cuda.threadIdx.x
            jb = I[C_I_JOBS] + job * N_JOB
            start, rows, order_off = batch_rows(I, jb)
            r0 = cuda.blockIdx.x * R
            if r0 >= rows:
                return
            n_in = I[jb + T_KIN]
            k = I[jb + T_K]
            a_x = I[jb + T_A_X] != 0
            a_off = I[jb + T_A_OFF]
            w = I[jb + T_W_OFF]
            logits = I[jb + T_LOGITS]
            dlogits = I[jb + T_DLOGITS]
            mode = I[jb + T_MODE]
            zero = F.dtype.type(0.0)
            for e in range(t, R * k, T):
                i = r0 + e // k
                j = e % k
                if i < rows:
                    acc = zero
                    if a_x:
                        row = start + i if order_off < 0 else I[order_off + start + i]
                        for q in range(n_in):
                            acc += X[row * n_in + q] * F[w + q * k + j]
                    else:
                        for q in range(n_in):
                            acc += F[a_off + i * n_in + q] * F[w + q * k + j]
                    F[logits + i * k + j] = acc + F[I[jb + T_B_OFF] + j]
            cuda.syncthreads()
            if I[jb + J_DYNAMIC] != 0:
                inv = step_scalar(F, I, SF_INV)
            else:
                inv = F[I[jb + J_INV]]
            for r in range(t, R, T):
                i = r0 + r
                if i < rows:
                    z = F[logits + i * k:logits + (i + 1) * k]
                    d = F[dlogits + i * k:dlogits + (i + 1) * k]
                    if mode == TAIL_PREDICT:
                        output_transform_row(d, z, I[C_LOSS])
                    else:
                        row = start + i if order_off < 0 else I[order_off + start + i]
                        row_loss = loss_grad_row(d, z, Y[row * k:(row + 1) * k], I[C_LOSS], inv)
                        weights = I[C_F_WEIGHTS]
                        if weights >= 0:  # the row counts w times: its loss and gradient scaled (as the CPU)
                            wr = F[weights + row]
                            row_loss *= wr
                            for j in range(k):
                                d[j] *= wr
                        F[I[jb + T_ROWS_OFF] + start + i] = row_loss
            if mode == TAIL_TRAIN and I[jb + T_INPUT_GRAD] != 0:
                cuda.syncthreads()
                dz = I[jb + T_DZ]
                act = I[jb + T_PREV_ACT]
                for e in range(t, R * n_in, T):
                    i = r0 + e // n_in
                    q = e % n_in
                    if i < rows:
                        acc = zero
                        for j in range(k):
                            acc += F[dlogits + i * k + j] * F[w + q * k + j]
                        F[dz + i * n_in + q] = acc * activation_grad(F[a_off + i * n_in + q], act)
        return _tail_kernel

    return base._cached(("tail", R, T), build)


@kernel
def _epoch_begin_kernel(F, I):
    # F[4P:7P] = F[0:3P] (parameters and optimizer state, P = I[C_P]) at the start of an epoch; after an epoch
    # that went non-finite (I[C_STOP] == STOP_NONFINITE) the copy runs the other way: the restore (idempotent).
    i = cuda.grid(1)
    P = I[C_P]
    if i < 3 * P:
        stop = I[C_STOP]
        if stop == 0:
            F[4 * P + i] = F[i]
        elif stop == STOP_NONFINITE:
            F[i] = F[4 * P + i]


def sum_kernels():
    RT = REDUCE_THREADS

    def build():
        @device_inline
        def sum_f64(partial, F, off, n, t):
            # The float64 sum of F[off:off + n], the same for every thread after the call: strided partial sums
            # in order, then a tree (a fixed order: deterministic).
            acc = np.float64(0.0)
            for r in range(t, n, RT):
                acc += np.float64(F[off + r])
            partial[t] = acc
            cuda.syncthreads()
            stride = RT // 2
            while stride > 0:
                if t < stride:
                    partial[t] += partial[t + stride]
                cuda.syncthreads()
                stride //= 2
            return partial[0]

        @strict_kernel
        def _epoch_end_kernel(F, D, I):
            # ONE block: the epoch's loss = (float64 sum of the row losses F[rows:rows + n]) / D[D_DIVISOR] into
            # D[D_LOSSES + epoch]; then the stopping rules (a non-finite loss: stop and restore at the next
            # _epoch_begin_kernel; a loss <= D[D_TARGET]: stop, keeping this epoch).
            partial = cuda.shared.array(RT, dtype=nbtypes.float64)
            if I[C_STOP] != 0:
                return
            t = cuda.threadIdx.x
            total = sum_f64(partial, F, I[C_F_ROWS], I[C_N], t)
            if t == 0:
                loss = total / D[D_DIVISOR]
                epoch = I[C_EPOCH]
                D[D_LOSSES + epoch] = loss
                I[C_EPOCH] = epoch + 1
                I[C_EPOCHS_RUN] = epoch + 1
                if math.isnan(loss) or math.isinf(loss):
                    I[C_STOP] = STOP_NONFINITE
                elif loss <= D[D_TARGET]:
                    I[C_STOP] = STOP_TARGET

        @strict_kernel
        def _loss_sum_kernel(F, D, off, n):
            # ONE block: D[D_EVAL] = float64 sum of F[off:off + n] (row losses of an evaluation).
            partial = cuda.shared.array(RT, dtype=nbtypes.float64)
            total = sum_f64(partial, F, off, n, cuda.threadIdx.x)
            if cuda.threadIdx.x == 0:
                D[D_EVAL] = total
        return _epoch_end_kernel, _loss_sum_kernel

    return base._cached(("sums", RT), build)


@kernel
def _update_kernel(F, I, s):
    # One optimizer update of every parameter p < I[C_P] from the gradient F[3P:4P], with the scalars of
    # step row s (apply_update outside the training loop).
    p = cuda.grid(1)
    if p < I[C_P]:
        optimizer_update(F, F, I, p, s)


# --- the arenas and the launch plan (host side) --------------------------------------------------------------
class ArenaLayout:
    """Offsets of every region of the F (float) and I (int64) arenas for one network, one workspace capacity
    (rows per batch), one data set size n and up to ``n_steps`` steps and ``n_orders`` order rows per call."""

    def __init__(self, layout, capacity: int, n: int, n_steps: int, n_orders: int, n_jobs: int, n_scratch: int,
                 n_counters: int, n_outputs: int):
        P = layout.n_params
        units = int(layout.unit_offsets[-1])
        self.P = P
        self.capacity = capacity
        self.n = n
        self.n_steps = n_steps
        self.n_orders = n_orders
        self.f_hyper = 7 * P
        self.f_one = self.f_hyper + N_HYPER_F  # a 1.0 (the loss divisor of an evaluation's row losses)
        self.f_inv = self.f_one + 1  # 1 / divisor of a rows_grads call
        self.f_sched = self.f_inv + 1
        self.f_acts = self.f_sched + N_STEP_F * n_steps
        self.f_deltas = self.f_acts + capacity * units
        self.f_rows = self.f_deltas + capacity * units
        self.f_weights = self.f_rows + max(n, 1)  # the sample weights of a weighted call (C_F_WEIGHTS)
        self.f_scratch = self.f_weights + max(n, 1)
        self.f_size = self.f_scratch + n_scratch
        self.i_steps = N_CTRL
        self.i_orders = self.i_steps + N_STEP_I * n_steps
        self.i_jobs = self.i_orders + n_orders
        self.i_counters = self.i_jobs + N_JOB * n_jobs
        self.i_size = self.i_counters + n_counters
        self.units = units
        self.layout = layout

    def slot(self, region: int, layer: int) -> int:
        """Offset in F of layer ``layer``'s (rows, sizes[layer]) slot of the acts or deltas region."""
        return region + self.capacity * int(self.layout.unit_offsets[layer])


def choose_config(jobs_sizes) -> str:
    """The product configuration for one launch whose jobs have output sizes [(M, N)]: 64 x 64 tiles with the
    8 x 8 register tile when the launch has LARGE_GRID_TILES of them, else 32 x 32 tiles (4 x 4)."""
    bm, bn = base.PRODUCT_CONFIGS["r8"][:2]
    tiles = sum(_ceil(m, bm) * _ceil(n, bn) for m, n in jobs_sizes)
    return "r8" if tiles >= LARGE_GRID_TILES else "r4s"


def _ceil(a: int, b: int) -> int:
    return max(1, -(-int(a) // int(b)))


class LaunchPlan:
    """The launches of one step (or one evaluation chunk) and the job rows they read.

    ``jobs``: (n_jobs, N_JOB) int64 rows to put at the arena's job table; ``launches``: [(kind, config, grid,
    block, job0, n_jobs, advance)] where kind is "product" or "tail"; ``scratch`` / ``counters``: the F and I
    space its split-K jobs need (offsets relative to the arena's scratch and counter regions, fixed by
    ``place``)."""

    def __init__(self):
        self.jobs = []
        self.launches = []
        self.scratch = 0
        self.counters = 0

    def add_product_launch(self, jobs, advance: bool):
        config = choose_config([(row[J_M] + (1 if row[J_A_ONES] >= 0 else 0), row[J_N]) for row in jobs])
        BM, BN, BK = base.PRODUCT_CONFIGS[config][:3]
        threads = tile_shapes(config)[5]
        job0 = len(self.jobs)
        block = 0
        for row in jobs:
            m_rows = row[J_M] + (1 if row[J_A_ONES] >= 0 else 0)
            tiles_n = _ceil(row[J_N], BN)
            tiles = _ceil(m_rows, BM) * tiles_n
            steps = _ceil(row[J_K], BK)
            splits = 1
            if config == "r4s":
                while (splits < MAX_SPLITS and tiles * splits < SPLIT_TARGET
                       and steps // (2 * splits) >= MIN_SPLIT_STEPS):
                    splits *= 2
            row[J_TILES_N] = tiles_n
            row[J_TILES] = tiles
            row[J_BLOCK0] = block
            row[J_SPLITS] = splits
            row[J_KSPLIT] = _ceil(steps, splits) * BK
            if splits > 1:
                row[J_SCRATCH] = self.scratch  # relative: place() adds the region's offset
                row[J_COUNTER] = self.counters
                self.scratch += tiles * splits * BM * BN
                self.counters += tiles
            block += tiles * splits
            self.jobs.append(row)
        self.launches.append(("product", config, block, threads, job0, len(jobs), int(advance)))

    def add_tail_launch(self, row, capacity: int):
        job0 = len(self.jobs)
        self.jobs.append(row)
        self.launches.append(("tail", None, _ceil(capacity, TAIL_ROWS), TAIL_THREADS, job0, 1, 0))

    def extend(self, other: "LaunchPlan") -> None:
        """Append another plan's launches and jobs (their job indices and split-K space shifted after ours)."""
        offset = len(self.jobs)
        for row in other.jobs:
            row = row.copy()
            if row[J_SPLITS] > 1:
                row[J_SCRATCH] += self.scratch
                row[J_COUNTER] += self.counters
            self.jobs.append(row)
        self.launches.extend((kind, config, grid, block, job0 + offset, n_jobs, advance)
                             for kind, config, grid, block, job0, n_jobs, advance in other.launches)
        self.scratch += other.scratch
        self.counters += other.counters

    def place(self, arena: ArenaLayout) -> np.ndarray:
        """The job rows with split-K scratch and counter offsets made absolute for ``arena``."""
        table = np.array(self.jobs, dtype=np.int64).reshape(len(self.jobs), N_JOB)
        split = table[:, J_SPLITS] > 1
        table[split, J_SCRATCH] += arena.f_scratch
        table[split, J_COUNTER] += arena.i_counters
        return table


def _product_row(form, M, N, K, axis, dynamic, start, rows, order):
    row = np.zeros(N_JOB, dtype=np.int64)
    row[[J_FORM, J_M, J_N, J_K, J_BATCH_AXIS, J_DYNAMIC, J_START, J_ROWS, J_ORDER]] = (
        form, M, N, K, axis, dynamic, start, rows, order)
    row[J_A_ONES] = -1
    row[J_SPLITS] = 1
    return row


def build_plan(arena: ArenaLayout, act_codes, capacity: int, *, rows_from_step: bool, start: int = 0,
               rows: int = 0, order: int = -1, train: bool = True, update: bool = True, accumulate: bool = False,
               advance: bool = True, predict: bool = False) -> LaunchPlan:
    """The launches of one step over ``capacity`` rows (see the module docstring).

    rows_from_step: rows come from the step table at I[C_STEP] (training), else (start, rows, order) are
    the job's own (evaluation chunks: order -1 means in order). train: loss-gradient and the backward
    launches (else a forward + loss or, with predict, + output transform only). update: weight gradients
    are applied by the optimizer in their epilogue; accumulate: added to the gradient buffer (chunks after
    the first); advance: the last launch advances I[C_STEP]."""
    layout = arena.layout
    sizes = [int(s) for s in layout.sizes]
    L = len(sizes) - 1
    P = arena.P
    dyn = int(rows_from_step)
    plan = LaunchPlan()
    acts = [arena.slot(arena.f_acts, l) for l in range(L + 1)]
    deltas = [arena.slot(arena.f_deltas, l) for l in range(L + 1)]

    def forward(l):
        n_in, n_out = sizes[l], sizes[l + 1]
        row = _product_row(FORWARD, capacity if dyn else rows, n_out, n_in, AXIS_M, dyn, start, rows, order)
        w = int(layout.param_offsets[l])
        if l == 0:  # reads its rows of X directly (the gather fused into the loads)
            row[[J_A_X, J_A_OFF]] = (1, 0)
        else:
            row[[J_A_X, J_A_OFF]] = (0, acts[l])
        row[[J_A_SI, J_A_SK, J_B_OFF, J_B_SJ, J_B_SK]] = (n_in, 1, w, 1, n_out)
        row[[J_C_OFF, J_C_LD, J_E_OFF, J_E_LD, J_ACT]] = (acts[l + 1], n_out, w + n_in * n_out, 0, act_codes[l])
        return row

    def input_grad(l):  # deltas[l] = (deltas[l + 1] @ W_l.T) * act'(acts[l])
        n_in, n_out = sizes[l], sizes[l + 1]
        row = _product_row(BACKWARD_INPUT, capacity if dyn else rows, n_in, n_out, AXIS_M, dyn, start, rows, order)
        w = int(layout.param_offsets[l])
        row[[J_A_X, J_A_OFF, J_A_SI, J_A_SK]] = (0, deltas[l + 1], n_out, 1)
        row[[J_B_OFF, J_B_SJ, J_B_SK]] = (w, n_out, 1)
        row[[J_C_OFF, J_C_LD, J_E_OFF, J_E_LD, J_ACT]] = (deltas[l], n_in, acts[l], n_in, act_codes[l - 1])
        return row

    def weight_grad(l):  # grads of layer l ([W; b] as one (n_in + 1, n_out) block) = [A_l, 1].T @ deltas[l + 1]
        n_in, n_out = sizes[l], sizes[l + 1]
        row = _product_row(BACKWARD_PARAMS, n_in, n_out, capacity if dyn else rows, AXIS_K, dyn, start, rows, order)
        w = int(layout.param_offsets[l])
        if l == 0:
            row[[J_A_X, J_A_OFF]] = (1, 0)
        else:
            row[[J_A_X, J_A_OFF]] = (0, acts[l])
        row[[J_A_SI, J_A_SK, J_A_ONES]] = (1, n_in, n_in)
        row[[J_B_OFF, J_B_SJ, J_B_SK]] = (deltas[l + 1], 1, n_out)
        row[[J_C_OFF, J_C_LD, J_P_OFF]] = (3 * P + w, n_out, w)
        row[J_MODE] = (MODE_ACCUMULATE if accumulate else 0) | (MODE_UPDATE if update else 0)
        return row

    def tail():
        n_in, k = sizes[L - 1], sizes[L]
        row = np.zeros(N_JOB, dtype=np.int64)
        row[[J_DYNAMIC, J_START, J_ROWS, J_ORDER]] = (dyn, start, rows, order)
        w = int(layout.param_offsets[L - 1])
        row[[T_MODE, T_KIN, T_K, T_A_X, T_A_OFF, T_W_OFF, T_B_OFF]] = (
            TAIL_PREDICT if predict else TAIL_TRAIN, n_in, k, int(L == 1), acts[L - 1] if L > 1 else 0, w,
            w + n_in * k)
        row[[T_LOGITS, T_DLOGITS, T_DZ, T_PREV_ACT, T_ROWS_OFF, T_INPUT_GRAD]] = (
            acts[L], deltas[L], deltas[L - 1], act_codes[L - 2] if L > 1 else 0,
            arena.f_rows, int(train and L > 1))
        row[J_INV] = arena.f_inv if train else arena.f_one
        return row

    for l in range(L - 1):
        plan.add_product_launch([forward(l)], advance=False)
    plan.add_tail_launch(tail(), capacity if dyn else rows)
    if not train:
        return plan
    for l in range(L - 2, 0, -1):
        plan.add_product_launch([input_grad(l), weight_grad(l + 1)], advance=False)
    plan.add_product_launch([weight_grad(l) for l in range(min(L - 1, 1), -1, -1)], advance=advance)
    return plan


def step_launch_records(plan: LaunchPlan, F, I, X, Y):
    """[(kernel, grid, block, args, shared)] of a plan's launches with these arenas and data (X, Y flat)."""
    records = []
    for kind, config, grid, block, job0, n_jobs, advance in plan.launches:
        if kind == "tail":
            records.append((tail_kernel(), grid, block, (F, I, X, Y, job0), 0))
        else:
            records.append((step_product_kernel(config, F.dtype), grid, block, (F, I, X, job0, n_jobs, advance), 0))
    return records


def epoch_begin_record(F, I, P: int):
    return (_epoch_begin_kernel, base._blocks(3 * P, EPOCH_THREADS), EPOCH_THREADS, (F, I), 0)


def epoch_end_record(F, D, I):
    return (sum_kernels()[0], 1, REDUCE_THREADS, (F, D, I), 0)


def loss_sum_record(F, D, off: int, n: int):
    return (sum_kernels()[1], 1, REDUCE_THREADS, (F, D, off, n), 0)


def update_record(F, I, P: int, s: int):
    return (_update_kernel, base._blocks(P, EPOCH_THREADS), EPOCH_THREADS, (F, I, s), 0)


def step_schedule(layout, loss: int, optimizer: int, hyper, lrs, n: int, k: int, batch_size: int, steps_done: int,
                  order_offsets, dtype, sample_weights=None, orders=None):
    """Host-side per-step tables of a call: (rows (n_steps, N_STEP_I) int64, scalars (n_steps, N_STEP_F) dtype).

    order_offsets[e]: the offset in I of epoch e's order, or -1 (in order). Scalars are formed in float64
    and cast, as the CPU's optimizer_step does. With sample_weights (n,), each batch's 1 / divisor is
    1 / (its weight sum * one row's divisor), 0 when its weights sum to 0 (kernels.cpu.weighted_inv_divisor);
    orders (E, n) then says which rows each epoch's batches hold (empty: in order)."""
    from .pointwise import loss_divisor

    starts = np.arange(0, n, batch_size, dtype=np.int64)
    per_epoch = len(starts)
    n_rows = np.minimum(batch_size, n - starts)
    E = len(lrs)
    steps = np.zeros((E * per_epoch, N_STEP_I), dtype=np.int64)
    sched = np.zeros((E * per_epoch, N_STEP_F), dtype=np.float64)
    t = steps_done + 1 + np.arange(E * per_epoch, dtype=np.float64)
    steps[:, S_START] = np.tile(starts, E)
    steps[:, S_ROWS] = np.tile(n_rows, E)
    steps[:, S_ORDER] = np.repeat(np.asarray(order_offsets, dtype=np.int64), per_epoch)
    steps[:, S_FIRST] = (t == 1).astype(np.int64)
    lr = np.repeat(np.asarray(lrs, dtype=np.float64), per_epoch)
    sched[:, SF_LR] = lr
    fill_adam_scalars(sched, optimizer, hyper, lr, t)
    if sample_weights is None:
        inv = np.tile([1.0 / loss_divisor(loss, int(r), k) for r in n_rows], E)
    else:
        w = np.asarray(sample_weights, dtype=np.float64)
        in_order = orders is None or orders.shape[1] == 0
        sums = np.concatenate([np.add.reduceat(w if in_order else w[orders[e]], starts) for e in range(E)])
        divisors = sums * loss_divisor(loss, 1, k)
        inv = np.divide(1.0, divisors, out=np.zeros_like(divisors), where=divisors > 0)
    sched[:, SF_INV] = inv
    return steps, sched.astype(dtype)


def fill_adam_scalars(sched, optimizer: int, hyper, lr, t) -> None:
    """Adam's and AdamW's per-step scalars into sched (..., N_STEP_F) for rates lr and step numbers t (scalars
    or per-step arrays), in float64 as the CPU's optimizer_step forms them."""
    if optimizer == SGD:
        return
    beta1, beta2 = float(hyper[H_BETA1]), float(hyper[H_BETA2])
    sched[..., SF_STEP_SIZE] = lr / (1.0 - beta1 ** t)
    sched[..., SF_SQRT_BC2] = np.sqrt(1.0 - beta2 ** t)
    sched[..., SF_L2], sched[..., SF_DECAY] = adam_decay_terms.py_func(optimizer, lr, float(hyper[H_WEIGHT_DECAY]))


def hyper_values(hyper, dtype) -> np.ndarray:
    values = np.zeros(N_HYPER_F, dtype=np.float64)
    values[[HF_MOMENTUM, HF_DAMPENING, HF_WEIGHT_DECAY, HF_BETA1, HF_BETA2, HF_EPS]] = (
        hyper[H_MOMENTUM], hyper[H_DAMPENING], hyper[H_WEIGHT_DECAY], hyper[H_BETA1], hyper[H_BETA2], hyper[H_EPS])
    return values.astype(dtype)


def nesterov_flag(hyper) -> int:
    return int(hyper[H_NESTEROV] != 0.0)


def kernel_signatures(f):
    """{name: (kernel, argument types)} of this module's kernels for float type ``f`` (see kernels.cuda)."""
    dtype = np.float32 if f == nbtypes.float32 else np.float64
    v = f[::1]
    i64 = nbtypes.int64
    iv = nbtypes.int64[::1]
    dv = nbtypes.float64[::1]
    end, loss_sum = sum_kernels()
    signatures = {
        "tail": (tail_kernel(), (v, iv, v, v, i64)),
        "epoch_begin": (_epoch_begin_kernel, (v, iv)),
        "epoch_end": (end, (v, dv, iv)),
        "loss_sum": (loss_sum, (v, dv, i64, i64)),
        "update": (_update_kernel, (v, iv, i64)),
    }
    for config in base.PRODUCT_CONFIGS:
        signatures[f"step_product_{config}"] = (step_product_kernel(config, dtype), (v, iv, v, i64, i64, i64))
    return signatures
