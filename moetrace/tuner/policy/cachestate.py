"""The state of the one expert-slot cache, and the primitives every policy may use.

The cache's state is a handful of arrays (:class:`State`) and its fixed configuration
another (:class:`Config`); both are namedtuples so the numba functions of :mod:`.core` and
of each policy module take them as one argument, and the simulator's kernel and the
runtime's :class:`~moetrace.tuner.policy.cache.ExpertCache` hold the very same arrays.
Column indices name what each policy keeps per slot, per (layer, expert) key, per
partition and globally; a policy's own columns are documented in its module.
"""

from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np

NO_NEXT_USE = 1e18

# per slot (slot_f)
SF_LAST, SF_INS, SF_SEG, SF_PF, SF_PF_PHASE = range(5)
NUM_SF = 5
# per key = layer * E + expert (key_f)
(
    KF_FREQ,
    KF_PIN,
    KF_TSCORE,
    KF_GHOST,
    KF_GSEQ,
    KF_GTIME,
    KF_CNT,
    KF_SH_LAST,
    KF_SH_IN,
    KF_ONLINE,
    KF_GAPR,
    KF_LAST_IN,
    KF_TSEEN,
) = range(13)
NUM_KF = 13
# per partition (part_f)
(
    PF_FILL,
    PF_CAP,
    PF_P,
    PF_SEG0,
    PF_SEG1,
    PF_SEG2,
    PF_N1,
    PF_N2,
    PF_W,
    PF_AGE,
    PF_SAMPLE_N,
    PF_SAMPLE_HITS,
    PF_PREV_RATE,
    PF_STEP,
    PF_DIR,
) = range(15)
NUM_PF = 15
# per layer (layer_f)
LF_SH_CAP, LF_SH_COUNT, LF_PASSES, LF_NPIN, LF_ELECTIONS, LF_EFF = range(6)
NUM_LF = 6
# global (glob)
(
    G_INC,
    G_INC_PREV,
    G_ACTIVE,
    G_DEST,
    G_CHOICE,
    G_WIN_N,
    G_WIN_HITS,
    G_WIN_SHADOW,
    G_SWITCH_AT,
    G_SWITCH_PLAN,
    G_SWITCH_LRU,
    G_ACCESSES,
    G_SHADOW_HITS,
    G_RNG,
    G_LAG,
) = range(15)
NUM_G = 15

# policy kinds: the numba dispatch in :mod:`.core` (see eviction.PolicyDef.kind)
KIND_LINEAR, KIND_ARC, KIND_TINYLFU, KIND_LECAR = range(4)

# parameters (prm): every kind reads its own entries; unset ones are defaults
(
    PR_DECAY,
    PR_USE_NEXT,
    PR_WINDOW,
    PR_PROTECTED,
    PR_SAMPLE,
    PR_STEP,
    PR_CLIMB,
    PR_LEARNING_RATE,
    PR_DISCOUNT,
    PR_SEED,
    PR_DRIFT_WINDOW,
    PR_DRIFT_MARGIN,
    PR_REPIN,
    PR_PRIOR_DECAY,
    PR_HALFLIFE,
) = range(15)
NUM_PR = 15

State = namedtuple(
    "State",
    ["where", "cursor", "slot_key", "slot_stamp", "slot_f", "key_f", "part_f", "layer_f",
     "layer_count", "glob", "rng", "trans_on"],
)  # fmt: skip
"""where (L*E,) slot of a key or -1; cursor (L*E,) next-use cursor (Belady only);
slot_key/slot_stamp (S,) the key a slot holds and the event that last protected it;
slot_f (S, NUM_SF); key_f (L*E, NUM_KF); part_f (P, NUM_PF); layer_f (L, NUM_LF);
layer_count (L,) slots a layer holds; glob (NUM_G,); rng (1,) uint64 xorshift state;
trans_on (L*E, E) live next-pass transition counts when a transition table is blended
online (:mod:`.priors`), else (1, 1)."""

Config = namedtuple(
    "Config",
    ["kinds", "part_of_layer", "part_lo", "part_hi", "min_share", "weights", "gap", "trans",
     "prm", "occ_ptr", "occ_ev", "prior", "num_experts"],
)  # fmt: skip
"""kinds (2,) the plan's policy kind and its drift fallback's; weights (2, 2, NUM_WEIGHTS)
per (plan/fallback, phase); gap (2, L*E); trans (L*E, E) or (1, 1); prm (NUM_PR,);
occ_ptr/occ_ev the next-use index (Belady only); prior (L*E,) the tune traffic's uses per
pass of each expert (the prior that re-elected pins and the gap table start from)."""


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def eligible(st: State, cfg: Config, s: int, layer: int, i: int) -> bool:
    """Whether slot ``s`` may be evicted for ``layer`` at event ``i``: not protected by the
    current event, not pinned, and (in a pool) not below its layer's guaranteed share.

    Branch-free on purpose: numba prunes the reference counting of the state's arrays
    around an inlined call only when its body is one basic block, and this runs for
    every slot a victim search looks at."""
    key = st.slot_key[s]
    ls = key // cfg.num_experts
    return (
        (st.slot_stamp[s] != i)
        & (st.key_f[key, KF_PIN] == 0.0)
        & ((ls == layer) | (st.layer_count[ls] > cfg.min_share[ls]))
    )


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def lru_in_segment(st: State, cfg: Config, p: int, layer: int, i: int, seg: float) -> int:
    """The least recently used evictable slot of partition ``p`` in segment ``seg`` (any
    segment when ``seg`` < 0), or -1."""
    best = -1
    bl = np.inf
    for s in range(cfg.part_lo[p], cfg.part_hi[p]):
        if seg >= 0.0 and st.slot_f[s, SF_SEG] != seg:
            continue
        if not eligible(st, cfg, s, layer, i):
            continue
        if st.slot_f[s, SF_LAST] < bl:
            bl = st.slot_f[s, SF_LAST]
            best = s
    return best


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def set_segment(st: State, p: int, s: int, seg: float) -> None:
    """Move slot ``s`` (resident, in partition ``p``) to segment ``seg``, keeping counts."""
    old = st.slot_f[s, SF_SEG]
    st.part_f[p, PF_SEG0 + int(old)] -= 1.0
    st.slot_f[s, SF_SEG] = seg
    st.part_f[p, PF_SEG0 + int(seg)] += 1.0


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def next_random(st: State) -> float:
    """A uniform number in [0, 1) from the cache's own xorshift64 state (deterministic, so
    the simulator and the runtime draw the same sequence)."""
    x = st.rng[0]
    x ^= (x << numba.uint64(13)) & numba.uint64(0xFFFFFFFFFFFFFFFF)
    x ^= x >> numba.uint64(7)
    x ^= (x << numba.uint64(17)) & numba.uint64(0xFFFFFFFFFFFFFFFF)
    st.rng[0] = x
    return float(x >> numba.uint64(11)) / 9007199254740992.0


def new_state(
    num_layers: int, num_experts: int, num_slots: int, num_parts: int, trans_online: bool = False
) -> State:
    """Zeroed state (no slot filled) for a cache of this shape."""
    LE = num_layers * num_experts
    glob = np.zeros(NUM_G)
    glob[G_INC] = glob[G_INC_PREV] = 1.0
    glob[G_SWITCH_AT] = -1.0
    return State(
        where=np.full(LE, -1, np.int64),
        cursor=np.zeros(LE, np.int64),
        slot_key=np.full(max(num_slots, 1), -1, np.int64),
        slot_stamp=np.full(max(num_slots, 1), -1, np.int64),
        slot_f=np.zeros((max(num_slots, 1), NUM_SF)),
        key_f=np.zeros((LE, NUM_KF)),
        part_f=np.zeros((num_parts, NUM_PF)),
        layer_f=np.zeros((num_layers, NUM_LF)),
        layer_count=np.zeros(num_layers, np.int64),
        glob=glob,
        rng=np.full(1, 0x9E3779B97F4A7C15, np.uint64),
        trans_on=np.zeros((LE, num_experts) if trans_online else (1, 1)),
    )
