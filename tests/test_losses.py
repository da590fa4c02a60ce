"""The paper's other baselines (SLiC, IPO, CPO, ORPO, KTO) through the public entry point: against TRL's own loss
functions where TRL is installed, float64 finite differences of the fused path, bf16 against the fp32 reference,
and the head module's pass-through of the loss keywords. (Each loss's formula is checked by hand in
test_objective.py; fp32 fused-vs-reference for every loss type in test_loss.py.)"""
import types
from pathlib import Path

import pytest
import torch

from amapo_fast import LinearPreferenceHead, linear_preference_loss
from amapo_fast.losses import LOSSES
from conftest import DEVICE
from test_loss import assert_matches, loss_kwargs, make_batch, reference_on, run

BASELINES = ["slic", "ipo", "cpo", "orpo", "kto"]
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def trl_logps(hidden, weight, bias, labels, average):
    """Per-row response log-probs by TRL's own get_batch_logps, from full float64 logits. TRL shifts inside; our
    labels are shifted already, so a leading ignored label and a trailing dummy logit line them up again."""
    from trl.experimental.cpo import CPOTrainer

    logits = hidden @ weight.T + bias
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average), logits[:, :-1]


def trl_chosen_nll(logits, labels, pairs):
    """TRL's NLL term: CrossEntropyLoss (mean over the non-ignored tokens) over the chosen rows' responses."""
    return torch.nn.CrossEntropyLoss()(logits[:pairs].reshape(-1, logits.shape[-1]), labels[:pairs].reshape(-1))


def trainer_self(**attributes):
    """The few attributes TRL's loss methods read from their trainer."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=DEVICE), alpha=0.0, **attributes)


def float64_batch(pairs=3):
    hidden, weight, labels, bias = make_batch(pairs=pairs, dim=16, vocab=53, dtype=torch.float64, bias=True)
    return [t.clone().requires_grad_(True) for t in (hidden, weight, bias)], labels


def assert_same_loss_and_grads(ours, theirs, leaves, rtol):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol)
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_cpo_matches_trl(label_smoothing):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    (hidden, weight, bias), labels = float64_batch()
    beta, nll_weight, pairs = 0.3, 0.7, 3
    ours, _ = linear_preference_loss(hidden, weight, labels, bias=bias, beta=beta, loss_type="cpo", impl="chunked",
                                     label_smoothing=label_smoothing, nll_weight=nll_weight)
    logps, logits = trl_logps(hidden, weight, bias, labels, average=False)
    trainer = trainer_self(beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing)
    losses, _, _ = CPOTrainer.cpo_loss(trainer, logps[:pairs], logps[pairs:])
    theirs = losses.mean() + nll_weight * trl_chosen_nll(logits, labels, pairs)
    assert_same_loss_and_grads(ours, theirs, [hidden, weight, bias], rtol=1e-10)


def test_ipo_matches_trl():
    """TRL's IPO: (h - 1/(2 beta))^2 on token-averaged log-ratios (its DPOTrainer's loss_type='ipo', which runs
    inside a model forward; its CPOTrainer's 'ipo' computes the same expression from the log-ratios given)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    (hidden, weight, bias), labels = float64_batch()
    beta, pairs = 0.4, 3
    ref = torch.randn(2 * pairs, dtype=torch.float64) * 3 - 12
    ours, _ = linear_preference_loss(hidden, weight, labels, bias=bias, beta=beta, loss_type="ipo", impl="chunked",
                                     ref_logps=ref)
    logps, _ = trl_logps(hidden, weight, bias, labels, average=True)
    ratios = logps - ref / (labels != -100).sum(1)
    losses, _, _ = CPOTrainer.cpo_loss(trainer_self(beta=beta, loss_type="ipo", label_smoothing=0.0),
                                       ratios[:pairs], ratios[pairs:])
    assert_same_loss_and_grads(ours, losses.mean(), [hidden, weight, bias], rtol=1e-10)


def test_orpo_matches_trl():
    """TRL's odds-ratio term and its NLL over the chosen responses. (TRL's ORPOTrainer takes its NLL over prompt and
    response tokens; the NLL here, like SLiC's and CPO's, is over the response tokens.) TRL casts the log-probs to
    fp32 before the odds ratio, hence the fp32 tolerance."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    (hidden, weight, bias), labels = float64_batch()
    beta, pairs = 0.25, 3
    ours, _ = linear_preference_loss(hidden, weight, labels, bias=bias, beta=beta, loss_type="orpo", impl="chunked")
    logps, logits = trl_logps(hidden, weight, bias, labels, average=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(trainer_self(beta=beta), logps[:pairs], logps[pairs:])
    theirs = trl_chosen_nll(logits, labels, pairs) - losses.mean()
    assert_same_loss_and_grads(ours, theirs.double(), [hidden, weight, bias], rtol=1e-5)


@pytest.mark.parametrize("loss_type", BASELINES)
def test_float64_gradcheck_chunked(loss_type):
    hidden, weight, labels, bias = make_batch(pairs=2, dim=6, vocab=11, dtype=torch.float64, bias=True)
    kwargs = loss_kwargs(loss_type, 4)

    def loss_of(h, w, b):
        return linear_preference_loss(h, w, labels, bias=b, impl="chunked", **kwargs)[0]

    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(loss_of, inputs)


@pytest.mark.parametrize("loss_type", BASELINES)
def test_bf16_against_fp32_reference(loss_type):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=48, vocab=300, dtype=torch.bfloat16, bias=True)
    kwargs = loss_kwargs(loss_type, 6)
    actual = run(hidden, weight, labels, bias, impl="chunked", **kwargs)
    assert_matches(actual, reference_on(hidden, weight, labels, bias, **kwargs), grad_rtol=2**-8, grad_dtype=torch.bfloat16)


@pytest.mark.parametrize("loss_type", ["slic", "kto"])
def test_head_module_passes_the_loss_keywords(loss_type):
    """Keywords given at construction (slic_delta, weights) and KTO's per-batch kto_kl reach the loss."""
    hidden, weight, labels, _ = make_batch(pairs=2, dim=12, vocab=40)
    lm_head = torch.nn.Linear(12, 40, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(weight)
    own = {"slic": dict(slic_delta=3.0, nll_weight=0.5), "kto": dict(desirable_weight=1.3)}[loss_type]
    head = LinearPreferenceHead(lm_head, beta=0.5, loss_type=loss_type, impl="chunked", **own)
    per_batch = {"kto_kl": torch.tensor(0.2)} if loss_type == "kto" else {}
    ref = (torch.randn(4, dtype=torch.float64) * 3 - 20) if LOSSES[loss_type].needs_reference else None
    loss, _ = head(hidden, labels, ref_logps=ref, **per_batch)
    expected, _ = linear_preference_loss(hidden, weight, labels, beta=0.5, loss_type=loss_type, impl="reference",
                                         ref_logps=ref, **own, **per_batch)
    torch.testing.assert_close(loss, expected)
    default, _ = linear_preference_loss(hidden, weight, labels, beta=0.5, loss_type=loss_type, impl="reference",
                                        ref_logps=ref, **({"kto_kl": 0.2} if loss_type == "kto" else {}))
    assert not torch.allclose(loss, default)  # the keywords changed the loss


RECIPES = [path for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
           if path.stem.rsplit("-", 1)[1] in LOSSES]


def test_every_setup_has_a_recipe_per_baseline():
    setups = {path.stem.rsplit("-", 1)[0] for path in RECIPES}
    assert len(setups) == 4 and len(RECIPES) == 4 * 7  # the paper's four setups x simpo, dpo and the five above


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_baseline_recipes_parse(path):
    from amapo_fast.config import parse_config

    config = parse_config(["--config", str(path)])
    assert config.loss_type == path.stem.rsplit("-", 1)[1]
    base = parse_config(["--config", str(path.with_name(path.stem.rsplit("-", 1)[0] + ".yaml"))])
    # Everything but the loss and its learning rate is the setup's recipe.
    differs = {name for name, value in vars(config).items() if vars(base)[name] != value}
    assert differs <= {"loss_type", "beta", "learning_rate", "output_dir", "gamma_beta_ratio", "slic_delta",
                       "nll_weight", "desirable_weight", "undesirable_weight"}, differs


def test_evaluation_report_has_amapo_dynamics():
    """`ranking_summary` (the evaluation report) carries the Table 1 figures of AMaPO's split over the whole set."""
    from amapo_fast import preference_objective
    from amapo_fast.evaluate import PairScores, markdown_table, ranking_summary

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 9, (2, 40), generator=generator)
    sums = -torch.rand(2, 40, generator=generator, dtype=torch.float64) * 3 * tokens
    scores = PairScores(sums[0], sums[1], tokens[0], tokens[1])
    summary = ranking_summary(scores, beta=2.0)
    _, metrics = preference_objective(sums.flatten(), tokens.flatten(), beta=2.0, loss_type="amapo", stats_scope="local")
    figures = summary["amapo_dynamics"]
    assert figures == {key.split("/", 1)[1]: pytest.approx(float(value)) for key, value in metrics.items()
                       if key.startswith("dynamics/")}
    assert sum(figures[f"case{k}"] for k in range(1, 5)) == pytest.approx(1.0)
    assert figures["case1"] + figures["case2"] == pytest.approx(summary["ranking_accuracy"])
    assert "AMaPO misranked gradient share %" in markdown_table({"model": {"overall": summary}})


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kl_completions_pair_each_prompt_with_the_next_chosen_response(packed):
    """KTO's mismatched completions: prompt i with the chosen response of pair i + 1 (the last with the first),
    truncated to max_length, under kl_ keys beside the ordinary batch."""
    from amapo_fast.data import PreferenceCollator
    from amapo_fast.losses.kto import KLCompletions

    rows = [{"prompt_input_ids": [1, 10 + i, 11 + i], "chosen_input_ids": [20 + i] * (2 + i),
             "rejected_input_ids": [30 + i]} for i in range(3)]
    collator = PreferenceCollator(0, packed=packed)
    batch = KLCompletions(collator, max_length=6)(rows)
    assert torch.equal(batch["input_ids"], collator(rows)["input_ids"])
    labels = batch["kl_labels"].reshape(-1) if packed else batch["kl_labels"]
    tokens = batch["kl_input_ids"].reshape(-1) if packed else batch["kl_input_ids"]
    bounds = batch["kl_cu_seqlens"].tolist() if packed else None
    for i, row in enumerate(rows):
        other = rows[(i + 1) % 3]["chosen_input_ids"][: 6 - 3]
        sequence = row["prompt_input_ids"] + other
        row_tokens = tokens[bounds[i]:bounds[i + 1]] if packed else tokens[i][: len(sequence) - 1]
        row_labels = labels[bounds[i]:bounds[i + 1]] if packed else labels[i]
        assert row_tokens.tolist() == sequence[:-1]
        assert [t for t in row_labels.tolist() if t != -100] == other


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss_type", "dpo", "--slic_delta", "2"], "slic_delta is a parameter of loss_type slic"),
        (["--loss_type", "orpo", "--label_smoothing", "0.1"], "takes no label smoothing"),
        (["--loss_type", "kto", "--per_device_train_batch_size", "1"], "at least 2"),
        (["--loss_type", "cpo", "--nll_weight", "-1"], "nll_weight=-1.0: must be >= 0"),
    ],
    ids=["foreign-keyword", "smoothing", "kto-one-pair", "negative-weight"],
)
def test_trainer_refuses_impossible_loss_settings(args, message):
    from amapo_fast.cli import UserError
    from amapo_fast.config import parse_config

    with pytest.raises(UserError, match=message):
        parse_config(args)
    assert parse_config(["--loss_type", "slic", "--slic_delta", "2"]).slic_delta == 2.0
