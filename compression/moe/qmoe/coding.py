"""QMoE's dictionary coding of ternary weights (Frantar & Alistarh 2023, "QMoE:
Practical Sub-1-Bit Compression of Trillion-Parameter Models", compressed format).

Ternary codes t in {-1, 0, +1} (the row's min, zero, the row's max) are read in pairs,
as ternary digits d = 0 for 0, 1 for -1, 2 for +1 and pair symbols s = d[2k] + 3 d[2k+1]
in 0..8. A dictionary of `DICTIONARY_SIZE` = 2^16 runs of 1..`MAX_PAIRS` = 14 pairs (up
to 28 weights) holds the most probable runs under an i.i.d. model of the pairs; a
codeword is a 16-bit dictionary index. With ~90% zeros most codewords stand for long
zero runs, which is how the format gets below one bit per weight.

- Dictionary: the paper builds it best-first (a priority queue) from an assumed P(0) =
  0.885; here the pair probabilities are measured on the codes being encoded and rounded
  to integer costs c_s ~ -log2 P(s) in 1/`COST_SCALE` bits. The dictionary is a
  deterministic function of those 9 integers (exact integer arithmetic, no float
  ties), so they are all that is stored: the 2^16-entry table is rebuilt bit for bit.
  It holds the 9 single pairs (so any sequence can be encoded) and the 2^16 - 9 runs of
  2..14 pairs of smallest cost, ties broken by length then lexicographic order; a run's
  cost is above its prefix's, so the set is prefix-closed, as the paper's is.
- Encoding: greedy longest match (the paper's trie walk: extend the run while the next
  pair keeps it in the dictionary, else emit it and restart). Here the longest match at
  every position is found at once, one vectorized lookup per run length, and the parse
  follows those lengths.
- Decoding: one table lookup per codeword (the paper's GPU kernel reads a fixed-size
  entry per codeword; here one gather over the whole stream).
- A sequence of odd length gets a zero digit appended, dropped again by the decoder,
  which is told the length. The paper restarts the stream at every row (one GPU warp
  decodes one row); here each matrix is one stream, since the CPU runtime decodes whole
  matrices, which saves the half codeword per row a restart costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DICTIONARY_SIZE = 2**16  # one codeword = one 16-bit dictionary index (the paper's)
MAX_PAIRS = 14  # longest run: 14 pairs = 28 weights, the paper's (its table packs 7 pairs per int32)
PAIR_SYMBOLS = 9  # 3 x 3 ternary digits
COST_SCALE = 64  # costs in 1/64 bit: fine enough that the chosen runs are the most probable ones


@dataclass(frozen=True)
class Dictionary:
    """The table of runs; `pair_costs` alone determines it (`build_dictionary`)."""

    pair_costs: Tensor  # (9,) int32, c_s >= 1: cost of pair symbol s in 1/COST_SCALE bits
    digits: Tensor  # (size, 2 * max_pairs) uint8 ternary digits of each run, zero padded
    lengths: Tensor  # (size,) int64 pairs in each run
    # Encoder lookup: for each run length L (index L - 1), the runs' values sum_k s_k 9^(L-1-k)
    # in ascending order and the codeword of each.
    values_by_length: tuple[Tensor, ...]  # L-th: (runs of length L,) int64, ascending
    words_by_length: tuple[Tensor, ...]  # L-th: (runs of length L,) int64 codewords

    @property
    def size(self) -> int:
        return int(self.lengths.numel())

    @property
    def max_pairs(self) -> int:
        return int(self.digits.shape[1]) // 2


def pair_symbols(digits: Tensor) -> Tensor:
    """Ternary digits (n,) -> pair symbols (ceil(n/2),) int64, s = d[2k] + 3 d[2k+1]."""
    d = digits.reshape(-1).to(torch.int64)
    if d.numel() % 2:
        d = torch.cat([d, d.new_zeros(1)])  # pad with a zero digit; the decoder drops it
    pairs = d.reshape(-1, 2)  # (n/2, 2)
    return pairs[:, 0] + 3 * pairs[:, 1]


def to_digits(codes: Tensor) -> Tensor:
    """Ternary codes {-1, 0, +1} -> digits {1, 0, 2} (uint8): the paper's min=1, max=2."""
    codes = codes.to(torch.int64)
    return torch.where(codes < 0, 1, torch.where(codes > 0, 2, 0)).to(torch.uint8)


def from_digits(digits: Tensor) -> Tensor:
    """Digits {0, 1, 2} -> ternary codes {0, -1, +1} (int8)."""
    table = torch.tensor([0, -1, 1], dtype=torch.int8)
    return table[digits.to(torch.int64)]


def pair_costs_of(codes: Tensor) -> Tensor:
    """The integer costs c_s = round(-log2 P(s) * COST_SCALE) of the pairs in `codes`.

    P(s) is smoothed (count + 1/2 per symbol, Krichevsky-Trofimov) so that a pair never
    seen still has a finite cost; every cost is at least 1, which keeps a run's cost
    strictly above its prefix's.
    """
    symbols = pair_symbols(to_digits(codes))  # (pairs,)
    counts = torch.bincount(symbols, minlength=PAIR_SYMBOLS).to(torch.float64)  # (9,)
    p = (counts + 0.5) / (counts.sum() + 0.5 * PAIR_SYMBOLS)
    costs = torch.round(-torch.log2(p) * COST_SCALE).clamp(min=1)
    return costs.to(torch.int32)


def build_dictionary(
    pair_costs: Tensor, size: int = DICTIONARY_SIZE, max_pairs: int = MAX_PAIRS
) -> Dictionary:
    """The `size` runs of 1..`max_pairs` pairs: the 9 single pairs and the cheapest longer runs.

    Longer runs are ranked by (cost, length, lexicographic order). First the cost
    threshold T is found by counting runs per (length, cost) (a convolution over costs,
    no enumeration); then the runs of cost <= T are enumerated length by length from
    their prefixes (all of cost < T, so at most `size` of them), keeping those tied at T
    in (length, lexicographic) order until `size` runs are found.
    """
    costs = pair_costs.to(torch.int64).reshape(-1)  # (9,)
    if costs.numel() != PAIR_SYMBOLS or bool((costs < 1).any()):
        raise ValueError(f"pair_costs must be {PAIR_SYMBOLS} integers >= 1, got {pair_costs.tolist()}")
    if not 1 <= max_pairs <= 14:  # 9^15 < 2^48: run values and run counts stay exact
        raise ValueError(f"max_pairs must be in 1..14, got {max_pairs}")
    longer = sum(PAIR_SYMBOLS**length for length in range(2, max_pairs + 1))
    if not PAIR_SYMBOLS <= size <= min(2**16, PAIR_SYMBOLS + longer):
        raise ValueError(
            f"size must be in {PAIR_SYMBOLS}..{min(2**16, PAIR_SYMBOLS + longer)} "
            f"(16-bit codewords, runs of up to {max_pairs} pairs), got {size}"
        )
    wanted = size - PAIR_SYMBOLS  # runs of 2 or more pairs
    # every longer run cheaper than T is in; of those costing exactly T, the first `ties`
    threshold, cheaper = _cost_threshold(costs, wanted, max_pairs) if wanted else (0, 0)
    ties = wanted - cheaper

    values = [torch.arange(PAIR_SYMBOLS, dtype=torch.int64)]  # runs of length 1, value = s
    frontier_values, frontier_costs = values[0], costs  # runs cheaper than T: their children may be in
    for _ in range(2, max_pairs + 1):
        if wanted == 0 or frontier_values.numel() == 0:
            break
        # children of every run cheaper than T that cost at most T: value * 9 + s, cost + c_s
        child_costs = (frontier_costs[:, None] + costs[None, :]).reshape(-1)  # (runs * 9,)
        within = torch.nonzero(child_costs <= threshold).reshape(-1)
        child_costs = child_costs[within]
        child_values = frontier_values[within // PAIR_SYMBOLS] * PAIR_SYMBOLS + within % PAIR_SYMBOLS
        below = child_costs < threshold
        tied = torch.nonzero(child_costs == threshold).reshape(-1)
        tied = tied[torch.argsort(child_values[tied])][:ties]  # shorter first, then lexicographic
        ties -= int(tied.numel())
        keep = torch.cat([torch.nonzero(below).reshape(-1), tied])
        values.append(child_values[keep])
        frontier_values, frontier_costs = child_values[below], child_costs[below]
    found = sum(int(v.numel()) for v in values)
    if found != size:
        raise AssertionError(f"dictionary construction found {found} runs, not {size}")

    # Codewords: single pairs first (word s = symbol s), then each length in value order.
    digits = torch.zeros(size, 2 * max_pairs, dtype=torch.uint8)  # zero padded
    lengths = torch.empty(size, dtype=torch.int64)
    values_by_length, words_by_length = [], []
    word = 0
    for length in range(1, max_pairs + 1):
        length_values = torch.sort(values[length - 1]).values if length <= len(values) \
            else torch.zeros(0, dtype=torch.int64)
        count = int(length_values.numel())
        values_by_length.append(length_values)
        words_by_length.append(torch.arange(word, word + count, dtype=torch.int64))
        symbols = _symbols_of(length_values, length).to(torch.uint8)  # (count, length)
        digits[word : word + count, 0 : 2 * length : 2] = symbols % 3  # first digit of each pair
        digits[word : word + count, 1 : 2 * length : 2] = symbols // 3
        lengths[word : word + count] = length
        word += count
    return Dictionary(
        pair_costs=costs.to(torch.int32),
        digits=digits,
        lengths=lengths,
        values_by_length=tuple(values_by_length),
        words_by_length=tuple(words_by_length),
    )


def _cost_threshold(costs: Tensor, wanted: int, max_pairs: int) -> tuple[int, int]:
    """(T, runs cheaper than T): the smallest T such that at least `wanted` runs of
    2..max_pairs pairs cost <= T, and how many of those cost < T."""
    width = max_pairs * int(costs.max()) + 1
    count = torch.zeros(width, dtype=torch.float64)  # runs of the current length, by cost
    count.index_add_(0, costs, torch.ones(PAIR_SYMBOLS, dtype=torch.float64))  # length 1
    total = torch.zeros(width, dtype=torch.float64)  # runs of length >= 2, by cost
    for _ in range(2, max_pairs + 1):
        longer = torch.zeros(width, dtype=torch.float64)
        for c in costs.tolist():  # append one pair of cost c to every run
            longer[c:] += count[: width - c]
        count = longer
        total += count
    # float64 counts are exact up to 2^53 (9^20 runs would not be; max_pairs <= 14 here
    # keeps every count below 9^15 < 2^48), and only counts up to `wanted` matter
    cumulative = torch.cumsum(total.clamp(max=float(2**48)), dim=0)
    threshold = int(torch.searchsorted(cumulative, float(wanted)))
    cheaper = int(cumulative[threshold - 1]) if threshold > 0 else 0
    return threshold, cheaper


def _symbols_of(values: Tensor, length: int) -> Tensor:
    """Run values (n,) -> their pair symbols (n, length), first pair first."""
    powers = PAIR_SYMBOLS ** torch.arange(length - 1, -1, -1, dtype=torch.int64)  # (length,)
    return (values[:, None] // powers) % PAIR_SYMBOLS


def encode(codes: Tensor, dictionary: Dictionary) -> Tensor:
    """Ternary codes (n,) in {-1, 0, 1} -> codewords (words,) int16 (uint16 bit patterns).

    Greedy longest match, as the paper's encoder: from the current pair, the longest run
    in the dictionary; then continue after it.
    """
    symbols = pair_symbols(to_digits(codes))  # (pairs,)
    n = int(symbols.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.int16)
    # longest[i], word[i]: the longest dictionary run starting at pair i and its codeword
    longest = torch.ones(n, dtype=torch.int64)
    word = symbols.clone()  # single pairs: codeword s
    value = symbols.clone()  # value of the run of the current length at each position
    alive = torch.ones(n, dtype=torch.bool)  # the run of the current length is in the dictionary
    for length in range(2, dictionary.max_pairs + 1):
        inside = n - length + 1  # positions whose run of this length fits in the sequence
        if inside <= 0:
            break
        table, words = dictionary.values_by_length[length - 1], dictionary.words_by_length[length - 1]
        value = value[:inside] * PAIR_SYMBOLS + symbols[length - 1 :]  # (inside,)
        alive = alive[:inside]
        if table.numel() == 0:
            break
        slot = torch.searchsorted(table, value).clamp(max=table.numel() - 1)  # (inside,)
        alive = alive & (table[slot] == value)  # prefix-closed: a longer run needs this one
        if not bool(alive.any()):
            break
        longest[:inside][alive] = length
        word[:inside][alive] = words[slot[alive]]
    # Follow the parse: from pair 0, jump by the longest run at each stop.
    steps, words_at = longest.tolist(), word.tolist()
    stream = []
    position = 0
    while position < n:
        stream.append(words_at[position])
        position += steps[position]
    out = torch.tensor(stream, dtype=torch.int32)
    return torch.where(out >= 2**15, out - 2**16, out).to(torch.int16)  # uint16 bit patterns


def decode(stream: Tensor, count: int, dictionary: Dictionary) -> Tensor:
    """Codewords (words,) int16 -> the `count` ternary codes (count,) int8 they encode."""
    digits = decode_digits(stream, dictionary)
    if digits.numel() < count or digits.numel() > count + 1:
        raise ValueError(f"the stream holds {digits.numel()} digits, not {count} (+1 padding)")
    return from_digits(digits[:count])


def decode_digits(stream: Tensor, dictionary: Dictionary) -> Tensor:
    """Codewords (words,) -> every ternary digit they stand for (uint8), padding included."""
    return lookup_digits(stream, dictionary.digits, dictionary.lengths)


def lookup_digits(stream: Tensor, digits: Tensor, lengths: Tensor) -> Tensor:
    """The decoder on the dictionary's tables: digits (size, 2 * max_pairs) uint8 and
    lengths (size,) pairs; codewords (words,) int16 -> their digits, in order."""
    words = stream.to(torch.int64) & 0xFFFF  # int16 bit patterns -> 0..65535
    # index_select and masked_select: 3-5x faster on CPU than rows[words] and rows[used]
    rows = torch.index_select(digits, 0, words)  # (words, 2 * max_pairs)
    pairs = torch.index_select(lengths, 0, words)  # (words,)
    used = torch.arange(digits.shape[1]) < 2 * pairs[:, None]  # (words, 2 * max_pairs)
    return torch.masked_select(rows, used)


def code_bits(words: int, count: int) -> float:
    """Bits per weight of `words` 16-bit codewords standing for `count` weights."""
    return 16.0 * words / count if count else math.nan
