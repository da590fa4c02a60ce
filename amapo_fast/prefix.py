"""Prefix sharing: each preference pair runs as one sequence [prompt | chosen | rejected], its prompt computed once.

Without sharing, a pair is two sequences, prompt + chosen and prompt + rejected, and the prompt runs through the
model twice. Shared, the pair is one block of tokens `prompt + chosen[:-1] + rejected[:-1]` in which
  * the chosen tokens attend to the prompt and to earlier chosen tokens (plain causal attention);
  * the rejected tokens attend to the prompt and to earlier rejected tokens, never to chosen tokens;
  * positions restart after the prompt: chosen token k and rejected token k both sit at len(prompt) + k,
so every hidden state equals the one its unshared sequence would give (rotary embeddings see the same
positions, attention the same keys). The last prompt position predicts the first token of both responses,
so the loss reads that hidden row twice: the batch carries an explicit response-token list (hidden row,
target, sequence) instead of a label per position.

Batch keys (built by `collate`, read by `PreferencePolicy`):
  input_ids, position_ids      [R, L]  R rows of blocks: one pair per row, or several per row (packed)
  prefix_block                 [R, L]  which pair a position belongs to; -1 on padding
  prefix_branch                [R, L]  PROMPT, CHOSEN or REJECTED
  response_index               [3, n]  per response token: row of hidden.reshape(-1, D), target, sequence
                                       (sequences 0..B-1 chosen, B..2B-1 rejected, in pair order)
  response_lengths             [2B]    response tokens per sequence
The attention mask is built on the model's device from prefix_block and prefix_branch (`attention_mask`):
a boolean [R, 1, L, L] mask for sdpa, an additive one for eager attention, and a FlexAttention BlockMask,
which skips the empty blocks, for flex_attention (the GPU choice: flash-attention-2 takes no such mask).
"""
import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PADDING = -1  # prefix_block of padding positions
# The attention implementations that take an arbitrary mask, i.e. that prefix sharing runs on.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def pair_block(prompt: list[int], chosen: list[int], rejected: list[int]):
    """One pair's block: (tokens, positions, branches, chosen response rows, rejected response rows), the rows
    being offsets in the block of the positions that predict each response token."""
    if not prompt or not chosen or not rejected:
        raise ValueError("a prefix-shared pair needs a non-empty prompt, chosen and rejected response")
    p, c, r = len(prompt), len(chosen), len(rejected)
    tokens = prompt + chosen[:-1] + rejected[:-1]
    positions = list(range(p)) + list(range(p, p + c - 1)) + list(range(p, p + r - 1))
    branches = [PROMPT] * p + [CHOSEN] * (c - 1) + [REJECTED] * (r - 1)
    chosen_rows = [p - 1] + list(range(p, p + c - 1))
    rejected_rows = [p - 1] + list(range(p + c - 1, p + c - 1 + r - 1))
    return tokens, positions, branches, chosen_rows, rejected_rows


def pack_blocks(lengths: list[int]) -> tuple[list[tuple[int, int]], int]:
    """(row, start) of each block and the number of rows: first-fit by decreasing length into rows as long as the
    longest block. Attention then costs about what one padded row per pair costs (rows x length^2) with little
    padding, where a single row of every block would cost (sum of lengths)^2 under a dense mask."""
    capacity = max(lengths)
    filled, places = [], [None] * len(lengths)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[index] <= capacity), len(filled))
        if row == len(filled):
            filled.append(0)
        places[index] = (row, filled[row])
        filled[row] += lengths[index]
    return places, len(filled)


def collate(pairs, pad_token_id: int, packed: bool) -> dict:
    """(prompt, chosen, rejected) token lists -> a prefix-shared batch (see the module docstring).

    packed: several pairs' blocks per row, each its own block (`pack_blocks`); otherwise one pair per row.
    Rows are right-padded to the longest block.
    """
    blocks = [pair_block(*pair) for pair in pairs]
    num_pairs = len(blocks)
    lengths = [len(block[0]) for block in blocks]
    if packed:
        places, rows = pack_blocks(lengths)
    else:
        places, rows = [(index, 0) for index in range(num_pairs)], num_pairs
    length = max(lengths)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    prefix_block = torch.full((rows, length), PADDING, dtype=torch.long)
    prefix_branch = torch.full((rows, length), PROMPT, dtype=torch.long)
    hidden_rows, targets, sequences = [], [], []
    for index, (block, (_, chosen, rejected), (row, start)) in enumerate(zip(blocks, pairs, places)):
        tokens, positions, branches, chosen_rows, rejected_rows = block
        end = start + len(tokens)
        input_ids[row, start:end] = torch.tensor(tokens)
        position_ids[row, start:end] = torch.tensor(positions)
        prefix_block[row, start:end] = index
        prefix_branch[row, start:end] = torch.tensor(branches)
        base = row * length + start  # flat index of the block's first position in hidden.reshape(-1, D)
        for sequence, block_rows, response in ((index, chosen_rows, chosen), (num_pairs + index, rejected_rows, rejected)):
            hidden_rows.append(torch.tensor(block_rows) + base)
            targets.append(torch.tensor(response))
            sequences.append(torch.full((len(response),), sequence))
    response_index = torch.stack([torch.cat(hidden_rows), torch.cat(targets), torch.cat(sequences)]).long()
    response_lengths = torch.tensor([len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs])
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "prefix_block": prefix_block,
        "prefix_branch": prefix_branch,
        "response_index": response_index,
        "response_lengths": response_lengths,
    }


def is_prefix_shared(batch: dict) -> bool:
    return "prefix_block" in batch


def unshared_token_count(batch: dict) -> int:
    """Tokens the batch's sequences hold in the unshared layout (each prompt counted once per response), so
    that throughput compares across layouts: a block's positions plus its prompt's once more."""
    real = batch["prefix_block"] != PADDING
    return int(real.sum() + (real & (batch["prefix_branch"] == PROMPT)).sum())


def _allowed(block_q, block_k, branch_q, branch_k, q, k):
    """Whether query position q may attend to key position k (elementwise over broadcast tensors): causal within
    the same pair block, rejected queries blind to chosen keys; every position sees itself, so padding rows
    attend to something and stay finite."""
    same_block = (block_q == block_k) & (block_q != PADDING)
    crosses = (branch_q == REJECTED) & (branch_k == CHOSEN)
    return (same_block & (k <= q) & ~crosses) | (q == k)


def dense_mask(prefix_block: torch.Tensor, prefix_branch: torch.Tensor) -> torch.Tensor:
    """Boolean [R, 1, L, L] mask, True where a query (dim 2) may attend to a key (dim 3)."""
    index = torch.arange(prefix_block.shape[1], device=prefix_block.device)
    mask = _allowed(
        prefix_block[:, :, None], prefix_block[:, None, :], prefix_branch[:, :, None], prefix_branch[:, None, :],
        index[:, None], index[None, :],
    )
    return mask[:, None]


def flex_block_mask(prefix_block: torch.Tensor, prefix_branch: torch.Tensor):
    """The same mask as a FlexAttention BlockMask (blocks with no allowed entry are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q, k):
        return _allowed(
            prefix_block[batch, q], prefix_block[batch, k], prefix_branch[batch, q], prefix_branch[batch, k], q, k
        )

    rows, length = prefix_block.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=prefix_block.device)


def check_sliding_window(config, batch: dict):
    """A sliding attention window (Mistral v0.1, Gemma's local layers) is not part of the mask built here, which is
    then exact only while every position lies inside the window."""
    window = getattr(config, "sliding_window", None)
    if window and int(batch["position_ids"].max()) >= window:
        raise ValueError(
            f"prefix sharing: a sequence reaches position {int(batch['position_ids'].max())}, beyond the model's "
            f"sliding attention window of {window}; shorten max_length or turn prefix sharing off"
        )


def attention_mask(batch: dict, attn_implementation: str, dtype: torch.dtype):
    """The 4-D mask (or BlockMask) that the model's attention implementation takes for a prefix-shared batch."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"prefix sharing needs an attention implementation that takes an arbitrary mask ({', '.join(ATTN_IMPLEMENTATIONS)}); "
            f"the model uses {attn_implementation!r}"
        )
    if attn_implementation == "flex_attention":
        return flex_block_mask(batch["prefix_block"], batch["prefix_branch"])
    mask = dense_mask(batch["prefix_block"], batch["prefix_branch"])
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def response_tokens(batch: dict, num_positions: int):
    """The batch's explicit response-token list as the loss takes it (`ResponseTokens`)."""
    from .loss import ResponseTokens

    hidden_rows, targets, sequence = batch["response_index"]
    return ResponseTokens.from_index(hidden_rows, targets, sequence, batch["response_lengths"].numel(), num_positions)
