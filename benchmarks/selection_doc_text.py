"""The hand-written paragraphs of docs/benchmarks_selection.md: what the CPU column means, how
the sharded rows run, and what each form of the policy costs (with what was tried and not
adopted).

Used by benchmarks/selection_report.py; kept apart so that the report writer stays short.
"""

from __future__ import annotations

CPU_COLUMN = (
    "The CPU column is the process's CPU time per epoch (median over the epochs after the "
    "first), all threads together: other processes cannot inflate it, and an idle machine "
    "needs at most that much wall time on one core (less where the sparse products run on "
    "two threads). On a loaded machine it is the figure to compare with the targets."
)
"""Under the intro: the CPU column of the table."""

SHARDED_ROWS = (
    "The sharded rows run the histogram-threshold protocol (1024 bins, boundary cap 65536) "
    "over in-process shards and were checked to give exactly the single-process epochs. "
    "Over Ray each broadcast is one round trip to every shard actor. An epoch makes "
    "`begin_epoch`, then per stage `open_stage`, the histogram rounds, one candidate pull "
    "and one take, then `finish` and `commit`. Class quotas are one stage whose messages "
    "carry every class at once (a (class, score bin) histogram), so the broadcasts stay a "
    "handful for 10 or 1000 classes; before, every class was its own stage of about 4 "
    "broadcasts (43 per epoch for 10 classes, about 4000 for 1000)."
)
"""After the tables: the sharded rows and their broadcasts."""

FORM_COSTS = (
    "What the forms cost. The literal form is one pass over the scores, the top m and "
    "the shuffle. The scores of every form are computed in cache-sized blocks (32768 "
    "samples) into a float64 buffer each shard reuses, so an epoch allocates no "
    "full-length temporary for them; every element goes through the same operations as "
    "before, so the epochs are unchanged (tests/unit/test_selection_blocks.py pins them). "
    "The top m finds the m-th largest score from a strided sample of 65536 scores: the "
    "sample brackets it, one count above the bracket and one compress inside it leave a "
    "small array to partition (the full partition where the bracket misses): the same "
    "picks as a partition of all N scores, in about half the time at 10M. Gumbel "
    "sampling adds one counter-based hash and two logarithms per sample, also blocked, "
    "on one thread. Class quotas take every class's top by the same top m over its "
    "positions (one scatter of the scores into class order per epoch; the class layout "
    "is a counting sort made once per shard), the classes split between the threads of "
    "the shard's pool (`SAELECT_SELECTION_THREADS`). The epoch shuffle is a function of "
    "the epoch's size only, so the engine draws it on the pool while the shards score, "
    "select and finish. Dynamic coverage is one sparse (N x M) matrix-vector product per "
    "shard and epoch (scipy CSR over the stored codes, k multiply-adds per sample, over "
    "row blocks on the pool: scipy releases the GIL, and a row's sum never crosses "
    "blocks, so the float32 sums are scipy's left-to-right row sums whatever the number "
    "of threads) plus the count of the units the epoch's selection covers. That count "
    "reads only the m selected rows: their int32 unit ids are gathered in blocks of "
    "16384 rows (2 MiB at k = 32, so they stay in cache) and each block is counted by a "
    "transposed sparse product with a vector of ones (about 0.6 ns per entry; np.bincount "
    "of the same ids in cache took 1.6 ns, as it casts them to int64 and scans them for "
    "their range first), the rows split between the threads; the counts are integers, "
    "so any split gives the same counts. It was a transposed product over all N rows "
    "before (N k entries of 8 bytes against m k of 4). Dynamic coverage keeps one "
    "float32 copy of the activations per shard (4 k bytes per sample; 4 k more for "
    "masked ids only where some activation is <= 0). The coverage weights remain the "
    "largest piece the defaults add: they read 8 bytes per stored code entry and are "
    "bound by memory bandwidth. scipy takes neither float16 values nor int16 ids, which "
    "would halve that; numpy's row sums add in another order (pairwise), which changes "
    "the float32 weights and so the epochs, and numpy in scipy's order (a sum over the "
    "first axis of transposed blocks of float16 values and int16 ids: the same bits, "
    "half the bytes) was measured at 3 to 4 times scipy's CPU time. A compiled loop "
    "(numba 0.68, tried and not adopted: it has no float16 arrays on the CPU, so the "
    "float16 bits were widened exactly by a shift and a power-of-two product; int16 ids; "
    "float32 left-to-right sums, the same bits as scipy's) took 2 to 3 times scipy's CPU "
    "time at N = 10M on one thread (0.55-0.65 s against 0.21-0.29 s), and counting the "
    "selected rows' units with it cost what the sparse products cost (0.17-0.23 s "
    "against 0.21-0.22 s). Updating the weights "
    "incrementally (a product over the columns of the units whose weight changed) would "
    "not be cheaper: the last row of the pieces table measures the share of units whose "
    "weight changes between epochs (the normalization S_t moves every unit's weight), so "
    "an incremental update touches as many entries as the full product."
)
"""After the tables: what each form costs, and what was tried."""
