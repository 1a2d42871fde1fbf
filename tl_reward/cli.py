"""The ``tl-reward`` command: a thin layer over the public API.

    tl-reward demo
    tl-reward score  MODEL --pairs pairs.jsonl [--out scores.csv]
    tl-reward lens   MODEL --pairs pairs.jsonl [--norm recomputed] [--out lens.json]
    tl-reward patch  MODEL --pairs pairs.jsonl [--hook z --per head --mode denoise] [--out cells.csv]
    tl-reward report MODEL --pairs pairs.jsonl --out report/

MODEL is a ``save_pretrained`` directory or the name of a shipped organism (``longtail``,
``planted``, ``dpo_longtail``, ``judge_longtail``). A causal LM directory is read as a generative judge
(``--judge-template "...{text}..."``) or as the policy of a DPO implicit reward
(``--beta B [--reference DIR]``). Pairs files are JSONL, JSON or CSV with ``chosen``/``rejected`` (and optionally
``prompt``) columns. A bad input prints one line to stderr and exits with status 1.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    name="tl-reward", help="Mechanistic interpretability of reward models.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
)


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Norm(str, Enum):
    cached = "cached"
    recomputed = "recomputed"


ModelArg = Annotated[str, typer.Argument(
    help="A save_pretrained directory of a *ForSequenceClassification model (or of a causal LM, "
    "with --judge-template or --beta), or an organism name.")]
PairsOpt = Annotated[Path, typer.Option("--pairs", help="JSONL / JSON / CSV of preference pairs.")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Write the table here (.csv or .json).")]
DeviceOpt = Annotated[str | None, typer.Option(help="torch device, e.g. cpu or cuda (default: cpu).")]
DTypeOpt = Annotated[DType, typer.Option(help="Weights and activations dtype.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Sequences per forward.")]
MaxPairsOpt = Annotated[int | None, typer.Option(min=1, help="Use at most this many pairs (drawn with --seed).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the pair draw and of torch.")]
ObjectiveOpt = Annotated[int | None, typer.Option(
    help="Objective index of a multi-objective head.")]
JudgeTemplateOpt = Annotated[str | None, typer.Option(
    "--judge-template", rich_help_panel="Causal LMs",
    help="MODEL is a causal LM read as a judge: its prompt, a format string with one {text} field; "
    "the reward is read at the prompt's last token.")]
JudgeReadOpt = Annotated[str, typer.Option(
    "--judge-read", rich_help_panel="Causal LMs",
    help="What the judge's reward is: yes_no (logit(--yes) - logit(--no)) or TOKEN=WEIGHT,... "
    "(a weighted sum of token logits).")]
YesOpt = Annotated[str, typer.Option("--yes", rich_help_panel="Causal LMs", help="The judge's yes token.")]
NoOpt = Annotated[str, typer.Option("--no", rich_help_panel="Causal LMs", help="The judge's no token.")]
BetaOpt = Annotated[float | None, typer.Option(
    "--beta", rich_help_panel="Causal LMs",
    help="MODEL is the policy of a DPO implicit reward beta * sum_t log pi/pi_ref over the response.")]
ReferenceOpt = Annotated[Path | None, typer.Option(
    "--reference", rich_help_panel="Causal LMs",
    help="The DPO reference causal LM's directory (omitted: no reference term).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Go on when most tokens are unknown to the tokenizer or a pair's chosen and "
    "rejected texts tokenise identically (the numbers would mean little).")]


def _version(value: bool | None) -> None:
    if value:
        from . import __version__

        typer.echo(f"tl-reward {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Mechanistic interpretability of reward models (TransformerLens hooks).

    Every command imports torch only after its arguments are parsed.
    """


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's deliberate errors into one line and exit status 1, no traceback."""
    import warnings

    from .errors import TLRewardError
    from .texts import SuspectInputWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SuspectInputWarning)  # _check_inputs says it, once
            yield
    except TLRewardError as err:
        _fail(str(err.args[0]) if err.args else type(err).__name__)  # KeyError's str() adds quotes


def _writable(path: Path, *, directory: bool) -> Path:
    """Check before any work that ``path`` (a directory, or a file's directory) can be written."""
    folder = path if directory else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".tl_reward_write_check"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        _fail(f"cannot write to {str(folder)!r}: {err.strerror or err}; choose another --out")
    return path


def _table_out(out: Path | None) -> Path | None:
    if out is None:
        return None
    if out.suffix not in (".csv", ".json"):
        _fail(f"--out {str(out)!r} must end in .csv or .json")
    return _writable(out, directory=False)


def _cell(text: Any) -> str:
    """A prompt as one CSV cell: the string, or a chat as JSON."""
    import json

    return text if isinstance(text, str) else json.dumps([dict(m) for m in text])


def _save_table(df: Any, out: Path | None) -> None:
    if out is None:
        return
    if out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        df.to_json(out, orient="records", indent=2)
    typer.echo(f"wrote {out}", err=True)


IMPLICIT_ORGANISM = "dpo_longtail"  # a DPO policy / reference pair: an implicit reward
JUDGE_ORGANISM = "judge_longtail"  # a causal LM with its own judge template and read-out


def _organism_names() -> list[str]:
    """The shipped organisms, read from the package folder (importing them would import torch)."""
    weights = Path(__file__).with_name("organisms") / "weights"
    return sorted(d.name for d in weights.iterdir()
                  if any((d / sub / "config.json").is_file() for sub in ("", "policy", "model")))


@dataclass(frozen=True)
class Source:
    """What MODEL is read as: a reward model, a judge (``template``) or an implicit reward."""

    model: str
    template: str | None = None
    read: str = "yes_no"
    yes: str = "Yes"
    no: str = "No"
    beta: float | None = None
    reference: Path | None = None

    @property
    def implicit(self) -> bool:
        return self.beta is not None or self.model == IMPLICIT_ORGANISM


def _architectures(directory: Path) -> list[str]:
    import json

    try:
        return list(json.loads((directory / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []  # the loader names what is wrong with it


def _check_kind(src: Source) -> None:
    """MODEL and the causal-LM options agree, before any heavy import."""
    if src.template is not None and src.implicit:
        _fail("--judge-template reads MODEL as a judge and --beta (or the dpo_longtail organism) "
              "as a DPO implicit reward: pass one")
    if src.model == IMPLICIT_ORGANISM and (src.beta is not None or src.reference is not None):
        _fail(f"the {IMPLICIT_ORGANISM} organism has its own reference and beta; drop --beta and "
              "--reference")
    if src.model == JUDGE_ORGANISM and (src.template is not None or src.beta is not None):
        _fail(f"the {JUDGE_ORGANISM} organism is a judge with its own template and read-out; drop "
              "--judge-template and --beta")
    if src.reference is not None and src.beta is None and src.model != IMPLICIT_ORGANISM:
        _fail("--reference needs --beta (the DPO temperature of the implicit reward)")
    if src.beta is not None and not src.beta > 0:
        _fail(f"--beta must be > 0, got {src.beta}")
    if src.reference is not None and not src.reference.is_dir():
        _fail(f"--reference {str(src.reference)!r} is not a local directory")
    path = Path(src.model)
    if not path.is_dir():
        if src.template is not None or src.beta is not None:
            _fail("--judge-template and --beta read a causal LM directory; MODEL "
                  f"{src.model!r} is not one")
        return
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(path))
    if causal and src.template is None and src.beta is None:
        _fail(f"{src.model!r} is a causal LM, not a reward model: pass --judge-template "
              "'...{text}...' to read it as a judge, or --beta B [--reference DIR] for its DPO "
              "implicit reward")


def _check_sources(model: str | Source, pairs: Path) -> None:
    """Fail on a missing model or pairs file, or options that do not fit it, before any heavy
    import."""
    if isinstance(model, Source):
        _check_kind(model)
        model = model.model
    if not (Path(model).exists() or model in _organism_names()):
        _fail(f"model {model!r} is neither a local save_pretrained directory nor a shipped "
              f"organism ({', '.join(_organism_names())}); tl_reward never downloads from a hub")
    if not pairs.is_file():
        _fail(f"pairs file {str(pairs)!r} does not exist")


def _setup(seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _judge_read(read: str) -> str | dict[str, float]:
    """``yes_no`` or ``TOKEN=WEIGHT,...`` as load_judge_reward_model's ``read``."""
    if read == "yes_no":
        return read
    weights = {}
    for item in read.split(","):
        token, eq, weight = item.rpartition("=")
        try:
            weights[token] = float(weight)
        except ValueError:
            eq = ""
        if not eq or not token:
            _fail(f"--judge-read {read!r}: give yes_no or TOKEN=WEIGHT,... (e.g. ' A=1, B=-1'); "
                  f"{item!r} is not TOKEN=WEIGHT")
    return weights


def _model(source: str | Source, device: str | None, dtype: DType, objective: int | None):
    """The HookedRewardModel (a judge is one) or, for an implicit source, the
    ImplicitRewardModel."""
    import torch

    from . import organisms
    from .loading import load_reward_model

    kwargs = {"device": device, "dtype": getattr(torch, dtype.value)}
    if isinstance(source, Source):
        if source.model == IMPLICIT_ORGANISM:
            from .organisms import dpo

            return dpo.load(**kwargs)[0]
        if source.model == JUDGE_ORGANISM:
            from .organisms import judge

            return judge.load(**kwargs)
        if source.implicit:
            from .loading.causal_lm import load_implicit_reward_model

            return load_implicit_reward_model(source.model, source.reference, beta=source.beta,
                                              **kwargs)
        if source.template is not None:
            from .loading.causal_lm import load_judge_reward_model

            return load_judge_reward_model(
                source.model, template=source.template, read=_judge_read(source.read),
                yes=source.yes, no=source.no, **kwargs)
        source = source.model
    if Path(source).exists():
        model = load_reward_model(source, **kwargs)
    elif source in organisms.available():
        model = load_reward_model(organisms.path(source), **kwargs)
    else:
        _fail(f"model {source!r} is neither a local save_pretrained directory nor a shipped "
              f"organism ({', '.join(organisms.available())}); tl_reward never downloads from a hub")
    if objective is not None:
        model.set_objective(objective)
    return model


def _check_inputs(model: Any, data: Any, force: bool) -> None:
    """Refuse pairs whose numbers would mean nothing, unless ``--force`` (then warn once)."""
    if not hasattr(model, "input_problems"):  # an implicit reward: encode() checks its pairs
        return
    problems = model.input_problems(data.chosen_texts, data.rejected_texts)
    if problems and not force:
        _fail("; ".join(problems) + ". Pass --force to go on anyway.")
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)


def _pairs_with_rows(path: Path, max_pairs: int | None, seed: int):
    """The pairs (drawn with ``seed`` when ``max_pairs``) and each one's row in the file, from 0."""
    from .data.pairs import load_pairs
    from .errors import InvalidInputError

    if not path.is_file():
        raise InvalidInputError(f"pairs file {str(path)!r} does not exist")
    full = load_pairs(path)
    if max_pairs is None:
        return full, list(range(len(full)))
    data = full.sample(max_pairs, seed=seed)
    row = {id(p): i for i, p in enumerate(full)}  # sample() keeps the pair objects
    return data, [row[id(p)] for p in data]


def _pairs(path: Path, max_pairs: int | None, seed: int):
    return _pairs_with_rows(path, max_pairs, seed)[0]


def _split(data: Any, side: str) -> tuple[list, list]:
    """Prompts and ``side`` responses as an implicit reward encodes them (prompt + response is
    the text a reward model scores)."""
    parts = [p.prompt_and_response(side) for p in data]
    return [p for p, _ in parts], [r for _, r in parts]


def _implicit_lens_table(model: Any, data: Any, batch_size: int):
    """Mean implicit reward of the chosen and rejected responses, and the margin, per layer."""
    import pandas as pd
    import torch

    from .implicit_analysis import implicit_reward_lens

    def per_layer(side: str) -> tuple[Any, tuple[str, ...]]:
        prompts, responses = _split(data, side)
        parts, labels = [], ()
        for s in range(0, len(prompts), batch_size):
            res = implicit_reward_lens(
                model, model.encode(prompts[s:s + batch_size], responses[s:s + batch_size]))
            parts.append(res.rewards)
            labels = res.labels
        return torch.cat(parts, 1), labels  # [layer, pair]

    chosen, labels = per_layer("chosen")
    rejected, _ = per_layer("rejected")
    return pd.DataFrame({"read_out": list(labels), "chosen": chosen.mean(1).cpu().numpy(),
                         "rejected": rejected.mean(1).cpu().numpy(),
                         "margin": (chosen - rejected).mean(1).cpu().numpy()})


def _implicit_patch_table(model: Any, data: Any, hook: str):
    """Reference -> policy patching on the chosen responses: mean effect per cell, largest first."""
    import pandas as pd

    from .implicit_analysis import implicit_activation_patch

    batch = model.encode(*_split(data, "chosen"))
    res = implicit_activation_patch(model, batch, hook=hook, direction="reference_to_policy")
    effect = res.effects.mean(1).cpu()
    df = pd.DataFrame({"cell": list(res.cells), "mean_effect": effect.numpy(),
                       "mean_reward": float(res.reward.mean())})
    return df.reindex(effect.abs().argsort(descending=True).numpy()).reset_index(drop=True)


@app.command()
def demo(
    pairs: Annotated[int, typer.Option(min=2, help="Head and tail pairs analysed.")] = 64,
    seed: SeedOpt = 0,
) -> None:
    """The README's main job: the longtail organism's tail gap, lens, attribution and patching."""
    from .demo import run_demo

    _setup(seed)
    with _user_errors():
        typer.echo(run_demo(pairs, seed=seed, progress=True).render())


@app.command()
def score(
    model: ModelArg, pairs: PairsOpt, out: OutOpt = None, device: DeviceOpt = None,
    dtype: DTypeOpt = DType.float32, batch_size: BatchOpt = 16, max_pairs: MaxPairsOpt = None,
    seed: SeedOpt = 0, objective: ObjectiveOpt = None, force: ForceOpt = False,
    judge_template: JudgeTemplateOpt = None, judge_read: JudgeReadOpt = "yes_no",
    yes: YesOpt = "Yes", no: NoOpt = "No", beta: BetaOpt = None, reference: ReferenceOpt = None,
) -> None:
    """Score preference pairs: accuracy, margins, one row per pair."""
    out = _table_out(out)
    src = Source(model, judge_template, judge_read, yes, no, beta, reference)
    _check_sources(src, pairs)
    _setup(seed)
    with _user_errors():
        rm, (data, rows) = _model(src, device, dtype, objective), _pairs_with_rows(
            pairs, max_pairs, seed)
        _check_inputs(rm, data, force)
        if src.implicit:  # the response after its prompt: the prompt is not scored
            (prompts, chosen), (_, rejected) = _split(data, "chosen"), _split(data, "rejected")
            scores = rm.score_pairs(prompts, chosen, rejected, batch_size=batch_size)
        else:
            scores = rm.score_pairs(data.chosen_texts, data.rejected_texts, batch_size=batch_size)
        df = scores.to_dataframe()
        df.insert(0, "pair", rows)
        df.insert(1, "scenario", list(data.scenarios))
        df.insert(2, "prompt", [_cell(p.prompt) for p in data])
        if scores.margin.ndim == 1:
            typer.echo(f"{len(data)} pairs, accuracy {scores.accuracy:.1%}, "
                       f"mean margin {float(scores.margin.mean()):+.4f}")
            by = df.assign(correct=df["margin"] > 0).groupby("scenario", sort=False)
            typer.echo(by.agg(pairs=("margin", "size"), accuracy=("correct", "mean"),
                              mean_margin=("margin", "mean")).to_string())
        else:
            typer.echo(df.describe().to_string())
        _save_table(df, out)


@app.command()
def lens(
    model: ModelArg, pairs: PairsOpt, norm: Annotated[Norm, typer.Option(help="Lens normalisation.")] = Norm.cached,
    out: OutOpt = None, device: DeviceOpt = None, dtype: DTypeOpt = DType.float32,
    batch_size: BatchOpt = 16, max_pairs: MaxPairsOpt = None, seed: SeedOpt = 0,
    objective: ObjectiveOpt = None, force: ForceOpt = False,
    judge_template: JudgeTemplateOpt = None, judge_read: JudgeReadOpt = "yes_no",
    yes: YesOpt = "Yes", no: NoOpt = "No", beta: BetaOpt = None, reference: ReferenceOpt = None,
) -> None:
    """Reward lens of the pairs: mean chosen, rejected and margin after each layer."""
    import pandas as pd

    from .observational.lens import pair_reward_lens

    out = _table_out(out)
    src = Source(model, judge_template, judge_read, yes, no, beta, reference)
    _check_sources(src, pairs)
    _setup(seed)
    with _user_errors():
        rm, data = _model(src, device, dtype, objective), _pairs(pairs, max_pairs, seed)
        _check_inputs(rm, data, force)
        if src.implicit:
            df = _implicit_lens_table(rm, data, batch_size)
            typer.echo(f"implicit reward lens (logit lens of the log-ratio, final norm recomputed), "
                       f"mean over {len(data)} pairs")
            typer.echo(df.to_string(index=False))
            _save_table(df, out)
            return
        res = pair_reward_lens(rm, data.chosen_texts, data.rejected_texts, norm=norm.value,
                               batch_size=batch_size)
        if res.margins.ndim != 2:
            _fail("the lens table needs a scalar reward; pass --objective")
        crystal = res.crystallisation_layer(0.9)
        df = pd.DataFrame({"read_out": list(res.chosen.labels),
                           "chosen": res.chosen.rewards.mean(1).numpy(),
                           "rejected": res.rejected.rewards.mean(1).numpy(),
                           "margin": res.margins.mean(1).numpy(),
                           "pairs_crystallised_here": [int((crystal == i).sum())
                                                       for i in range(len(res.chosen.labels))]})
        typer.echo(f"reward lens (norm={norm.value}), mean over {len(data)} pairs")
        typer.echo(df.to_string(index=False))
        _save_table(df, out)


@app.command()
def patch(
    model: ModelArg, pairs: PairsOpt,
    hook: Annotated[str, typer.Option(help="resid_pre, attn_out, mlp_out, z, q, k, v, pattern, mlp_post, ...")] = "z",
    per: Annotated[str, typer.Option(help="layer, layer_pos, head, head_pos or neuron.")] = "head",
    mode: Annotated[str, typer.Option(
        help="denoise, noise, zero or mean (over the pairs' chosen and rejected texts).")] = "denoise",
    top: Annotated[int, typer.Option(min=1, help="Cells shown.")] = 10,
    out: OutOpt = None, device: DeviceOpt = None, dtype: DTypeOpt = DType.float32,
    batch_size: BatchOpt = 64, max_pairs: MaxPairsOpt = 16, seed: SeedOpt = 0,
    objective: ObjectiveOpt = None, force: ForceOpt = False,
    judge_template: JudgeTemplateOpt = None, judge_read: JudgeReadOpt = "yes_no",
    yes: YesOpt = "Yes", no: NoOpt = "No", beta: BetaOpt = None, reference: ReferenceOpt = None,
) -> None:
    """Exact activation patching, chosen = clean, rejected = corrupt: the cells with most effect.

    For a DPO implicit reward: the reference's activations patched into the policy (one layer's
    hook, or one head's z), on the chosen responses: which components carry what DPO changed."""

    from .causal.patching import activation_patch

    out = _table_out(out)
    src = Source(model, judge_template, judge_read, yes, no, beta, reference)
    _check_sources(src, pairs)
    if src.implicit and (mode != "denoise" or per not in ("head", "layer")):
        _fail(f"--mode {mode} --per {per}: for a DPO implicit reward, patch replaces the policy's "
              "activations by the reference's (per layer, or per head for --hook z); leave "
              "--mode and --per at their defaults")
    _setup(seed)
    with _user_errors():
        rm, data = _model(src, device, dtype, objective), _pairs(pairs, max_pairs, seed)
        _check_inputs(rm, data, force)
        if src.implicit:
            df = _implicit_patch_table(rm, data, hook)
            typer.echo(f"reference -> policy patching of {hook} on the chosen responses of "
                       f"{len(data)} pairs: {len(df)} cells (effect on the implicit reward)")
            typer.echo(df.head(top).to_string(index=False))
            _save_table(df, out)
            return
        # mean ablation: the mean over every chosen and rejected text of the pairs used
        reference = data.chosen_texts + data.rejected_texts if mode == "mean" else None
        res = activation_patch(rm, data.chosen_texts, data.rejected_texts, hook=hook, per=per,
                               mode=mode, reference=reference, max_rows=batch_size)
        df, s = res.cells(), res.stats
        ref = " (mean over their chosen and rejected texts)" if reference is not None else ""
        typer.echo(f"{mode} patching of {hook} per {per} on {len(data)} pairs{ref}: {len(df)} "
                   f"cells, {s.n_forwards} forwards, {s.seconds:.2f} s")
        typer.echo(res.top(top).to_string(index=False))
        _save_table(df, out)


@app.command()
def report(
    model: ModelArg, pairs: PairsOpt,
    out: Annotated[Path, typer.Option("--out", help=(
        "A page name ending in .html (its numbers go beside it, same name, .json), or a folder "
        "for report.html and report.json."))] = Path("tl_reward_report"),
    patch_pairs: Annotated[int, typer.Option(min=1, help="Pairs used for exact head patching.")] = 8,
    probes: Annotated[bool, typer.Option(help="Run the built-in reward-hacking probes.")] = True,
    device: DeviceOpt = None, dtype: DTypeOpt = DType.float32, batch_size: BatchOpt = 16,
    max_pairs: MaxPairsOpt = None, seed: SeedOpt = 0, objective: ObjectiveOpt = None,
    force: ForceOpt = False,
    judge_template: JudgeTemplateOpt = None, judge_read: JudgeReadOpt = "yes_no",
    yes: YesOpt = "Yes", no: NoOpt = "No", beta: BetaOpt = None, reference: ReferenceOpt = None,
) -> None:
    """One self-contained HTML page (scores, lens, attribution, patching, probes) and a JSON of every number.

    For a DPO implicit reward: scores, the lens of the log-ratio, the linearised attribution of
    the margin, policy -> reference head patching and the probes; the page says what does not
    apply (no score head)."""
    src = Source(model, judge_template, judge_read, yes, no, beta, reference)
    _check_sources(src, pairs)
    if out.suffix.lower() == ".json":
        _fail(f"--out {str(out)!r}: name the page (.html) or a folder; the JSON goes beside the page")
    is_page = out.suffix.lower() in (".html", ".htm")
    if not is_page and out.is_file():
        _fail(f"--out {str(out)!r} is an existing file, not a folder; name a folder or an .html page")
    _writable(out, directory=not is_page)
    from .report import build_implicit_report, build_report

    _setup(seed)
    with _user_errors():
        rm, data = _model(src, device, dtype, objective), _pairs(pairs, max_pairs, seed)
        _check_inputs(rm, data, force)
        build = build_implicit_report if src.implicit else build_report
        rep = build(rm, data, patch_pairs=patch_pairs, batch_size=batch_size,
                           probes="builtin" if probes else None,
                           title=f"tl_reward report: {model} on {pairs.name}")
        page, numbers = rep.write(out)
        s = rep.numbers["scores"]
        typer.echo(f"{s['n_pairs']} pairs, accuracy {s['accuracy']:.1%}, "
                   f"mean margin {s['mean_margin']:+.4f}")
        typer.echo(f"wrote {page} and {numbers}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
