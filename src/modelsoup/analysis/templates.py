"""Weight templates (Wang et al. 2024, "Rethinking weight-averaged model-merging", arXiv 2411.09263).

The weights a classifier applies to its inputs for each class form a per-class pattern, a "template";
averaging models averages their templates, which is one way to see what a soup keeps and what it loses.

* Inputs with a spatial layout (an image classifier): the templates are the class weights of a linear
  classifier, or, for a stack of linear layers, their product W_k ... W_1 (activations and biases are
  ignored: exact for a linear model, a first-order picture otherwise). Each row is reshaped to the
  image (e.g. 8 x 8 for scikit-learn's digits).
* A text classifier: the class weights projected on the vocabulary, W_classifier W_pooler E^T for a
  BERT-style model (the pooler's tanh ignored), so each class gets a score per token; the top tokens
  per class show what the head looks for.

:func:`template_correlations` gives, per class, the Pearson correlation between each model's template
and a reference's (e.g. the soup's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SoupError

# the BERT sequence classifier's tensors used for vocabulary templates
BERT_NAMES = {"classifier": "classifier.weight", "pooler": "bert.pooler.dense.weight", "embeddings": "bert.embeddings.word_embeddings.weight"}


class TemplateError(SoupError):
    """Templates cannot be formed from the given weights (no such tensor, shapes that do not chain)."""


def linear_chain(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The 2-D ``*.weight`` tensors in order, when each one's input size is the previous one's output size."""
    names = [n for n in state if n.endswith("weight") and state[n].ndim == 2 and state[n].is_floating_point()]
    for a, b in zip(names, names[1:]):
        if state[b].shape[1] != state[a].shape[0]:
            raise TemplateError(f"'{b}' takes {state[b].shape[1]} inputs but '{a}' gives {state[a].shape[0]}: not a stack of linear layers; name the layers with chain=")
    if not names:
        raise TemplateError("no 2-D weight tensor found; name the classifier weight with weight=")
    return names


def class_templates(state: Mapping[str, torch.Tensor], *, weight: str | None = None, chain: Sequence[str] | None = None) -> torch.Tensor:
    """(classes, inputs) templates: one weight (``weight``), the product of a chain of weights (``chain``,
    input layer first), or by default the chain of all 2-D weights of a linear stack.

    Raises:
        TemplateError: an unknown tensor, or shapes that do not chain.
    """
    names = [weight] if weight is not None else list(chain) if chain is not None else linear_chain(state)
    for n in names:
        if n not in state:
            raise TemplateError(f"no tensor '{n}' in the weights (2-D weights: {', '.join(k for k in state if state[k].ndim == 2)})")
    out = state[names[0]].double()
    for n in names[1:]:
        w = state[n].double()
        if w.shape[1] != out.shape[0]:
            raise TemplateError(f"'{n}' takes {w.shape[1]} inputs but the layers before it give {out.shape[0]}")
        out = w @ out
    return out


def vocabulary_templates(state: Mapping[str, torch.Tensor], names: Mapping[str, str] = BERT_NAMES) -> torch.Tensor:
    """(classes, vocabulary) scores: classifier x pooler x word embeddings^T (see the module doc).

    Raises:
        TemplateError: a tensor is missing.
    """
    missing = [v for v in names.values() if v not in state]
    if missing:
        raise TemplateError(f"vocabulary templates need {', '.join(missing)}; this is not a BERT sequence classifier (give names=)")
    return state[names["classifier"]].double() @ state[names["pooler"]].double() @ state[names["embeddings"]].double().T


def template_correlations(templates: Mapping[str, torch.Tensor], reference: str) -> dict[str, list[float]]:
    """Per class, the Pearson correlation of each model's template with ``reference``'s."""
    ref = templates[reference]
    out = {}
    for name, t in templates.items():
        a = t - t.mean(1, keepdim=True)
        b = ref - ref.mean(1, keepdim=True)
        out[name] = [float(x) for x in (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)]
    return out


def top_tokens(templates: torch.Tensor, tokenizer: Any, k: int = 10) -> list[list[str]]:
    """The ``k`` tokens with the highest score for each class (the tokenizer maps ids to tokens)."""
    return [tokenizer.convert_ids_to_tokens(row.topk(k).indices.tolist()) for row in templates]


def template_grid(templates: Mapping[str, torch.Tensor], shape: tuple[int, int], path: Path, *, correlations: Mapping[str, Sequence[float]] | None = None,
                  reference: str | None = None, class_names: Sequence[str] | None = None) -> Path:
    """A PNG grid: one row per model, one column per class, each template reshaped to ``shape``.

    Each template is shown minus its mean (a constant shift carries no pattern, and correlations ignore
    it), with colours symmetric around zero (red above the mean, blue below); a row's label gives its
    mean correlation with ``reference`` when ``correlations`` are given.
    """
    from .figures import pyplot

    plt = pyplot()
    rows = list(templates)
    classes = next(iter(templates.values())).shape[0]
    for name, t in templates.items():
        if t.shape[1] != shape[0] * shape[1]:
            raise TemplateError(f"{name}: templates have {t.shape[1]} inputs, which do not fill a {shape[0]}x{shape[1]} image")
    fig, axes = plt.subplots(len(rows), classes, figsize=(1.0 * classes + 1.6, 1.05 * len(rows) + 0.6), squeeze=False)
    for r, name in enumerate(rows):
        t = templates[name]
        for c in range(classes):
            ax = axes[r][c]
            img = (t[c] - t[c].mean()).reshape(shape)
            v = float(img.abs().max()) or 1.0
            ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-v, vmax=v)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(class_names[c] if class_names else str(c), fontsize=9)
        label = name
        if correlations is not None and reference is not None and name != reference:
            corr = correlations[name]
            label += f"\nr={sum(corr) / len(corr):.2f}"
        axes[r][0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("Class templates" + (f" (r: mean correlation with {reference})" if reference and correlations else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_templates(
    inputs: Sequence[str | Path],
    soup: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    key: str | None = None,
    strip_prefix: str | None = None,
    vocabulary: bool = False,
    tokenizer: str | Path | None = None,
    top: int = 10,
    shape: tuple[int, int] = (8, 8),
    weight: str | None = None,
    chain: Sequence[str] | None = None,
) -> str:
    """Templates of the ingredients and the soup, their correlations with the soup's, written to ``output``.

    Writes ``templates.md``, ``templates.json`` and (image inputs) ``templates.png``, or with
    ``vocabulary`` each class's top tokens.

    Returns:
        The Markdown table (and token lists).

    Raises:
        OutputExistsError, OutputError: the output cannot be written; nothing is.
    """
    import json

    from ..io import open_checkpoint
    from ..io.output import check_output, staged_output
    from ..recipes.pantry import short_labels

    out = Path(output)
    sources = [*inputs, soup]
    check_output(out, overwrite, inputs=sources)
    labels = short_labels(sources)
    labels[-1] = f"{labels[-1]} (soup)"
    states = {}
    for label, src in zip(labels, sources):
        with open_checkpoint(src, key=key, strip_prefix=strip_prefix) as ck:
            states[label] = {n: ck.read(n) for n in ck.names() if len(ck.meta(n)[1]) == 2}
    if vocabulary:
        temps = {k: vocabulary_templates(v) for k, v in states.items()}
    else:
        temps = {k: class_templates(v, weight=weight, chain=chain) for k, v in states.items()}
    corr = template_correlations(temps, labels[-1])
    lines = [f"| model | mean r with {labels[-1]} | per class |", "|---|---:|---|"]
    lines += [f"| {k} | {sum(v) / len(v):.3f} | {', '.join(f'{x:.2f}' for x in v)} |" for k, v in corr.items()]
    with staged_output(out, overwrite, inputs=sources) as tmp:
        if vocabulary:
            from ..eval.text import require_transformers

            tok = require_transformers().AutoTokenizer.from_pretrained(tokenizer or soup, local_files_only=True)
            lines += ["", f"Top {top} tokens per class:", ""]
            for k, t in temps.items():
                lines += [f"- {k}: " + " | ".join(f"class {c}: {' '.join(toks)}" for c, toks in enumerate(top_tokens(t, tok, top)))]
        else:
            template_grid(temps, shape, tmp / "templates.png", correlations=corr, reference=labels[-1])
        (tmp / "templates.md").write_text("\n".join(lines) + "\n")
        (tmp / "templates.json").write_text(json.dumps({"reference": labels[-1], "correlations": corr}, indent=1))
    return "\n".join(lines)
