"""``soup merge``, ``soup validate``, ``soup methods``: parse, build the recipe, call the library."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..errors import SoupError
from .options import parse_set, parse_weights, progress

log = logging.getLogger("modelsoup")


# mergekit-yaml options that change nothing here, and why. (mergekit's --cuda is --device cuda.)
_NOT_NEEDED = {
    "lazy_unpickle": "torch checkpoints are always read lazily (and only with weights_only)",
    "low_cpu_memory": "memory stays at about one tensor per model per worker",
}


def parse_kmb(text: str) -> int:
    """mergekit's size syntax: a number of bytes with an optional K, M or B (10^3, 10^6, 10^9) suffix."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not (digits.isascii() and digits.isdigit()) or int(digits) == 0:
        raise SoupError(f"--out-shard-size {text!r}: give a number of bytes with an optional K, M or B suffix, as mergekit reads it (e.g. 5B)")
    return int(digits) * scale


def _mergekit_options(a: argparse.Namespace, recipe: Any) -> Any:
    """Apply the mergekit-yaml options given (their mergekit meaning) to a loaded recipe."""
    for flag, why in _NOT_NEEDED.items():
        if getattr(a, flag):
            log.warning("--%s is not needed: %s", flag.replace("_", "-"), why)
    if a.allow_crimes:
        log.warning("--allow-crimes is not needed: modelsoup merges any models whose tensor names and shapes line up, and refuses the rest")
    output = recipe.output
    if a.out_shard_size is not None:
        output = dataclasses.replace(output, shard_size=parse_kmb(a.out_shard_size))
    if a.copy_tokenizer is not None:
        output = dataclasses.replace(output, copy_tokenizer=a.copy_tokenizer)
    changes: dict[str, Any] = {"output": output}
    if a.random_seed is not None:
        changes["seed"] = a.random_seed
    return dataclasses.replace(recipe, **changes)


def _merge_stages(a: argparse.Namespace) -> int:
    """A multi-stage recipe (mergekit-multi): every stage validated, then run in order."""
    from ..api import merge_stages

    extra = [f for f in ("out_shard_size", "random_seed", "allow_nonfinite") if getattr(a, f) not in (None, False)] + (["copy_tokenizer"] if a.copy_tokenizer is not None else [])
    if extra:
        raise SoupError(f"--{extra[0].replace('_', '-')} is not applied to multi-stage recipes; set it in each stage of {a.inputs[0]}")
    result = merge_stages(a.inputs[0], a.output, intermediate_dir=a.intermediate_dir, overwrite=a.overwrite, workers=a.workers,
                          progress=progress(a), hash_files=not a.no_hash)
    print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")
    return 0


def _device(a: argparse.Namespace) -> Any:
    """The device of --device / --cuda (mergekit's name for --device cuda), checked before anything is read."""
    from ..devices import resolve_device

    if a.cuda and a.device not in (None, "cuda") and not str(a.device).startswith("cuda"):
        raise SoupError(f"--cuda and --device {a.device} disagree; give one (--cuda is --device cuda)")
    if a.cuda and a.device is None:
        return resolve_device("cuda", "--cuda")
    return resolve_device(a.device, "--device")


def _print_estimate(a: argparse.Namespace, est: Any) -> None:
    import json

    if a.json:
        print(json.dumps(est.to_dict(), indent=1))
    else:
        print(est.describe())
        print("dry run: nothing was written")


def cmd_merge(a: argparse.Namespace) -> int:
    from ..api import merge
    from ..methods import get_method
    from ..recipe import read_recipe, recipe_from_dict

    is_recipe = bool(a.inputs) and a.method is None and Path(a.inputs[0]).suffix.lower() in (".yaml", ".yml")
    if is_recipe and len(a.inputs) > 2:
        raise SoupError(f"a recipe file takes one output: soup merge {a.inputs[0]} OUT; got {len(a.inputs) - 1} ({', '.join(a.inputs[1:])})")
    if is_recipe and len(a.inputs) == 2:  # `soup merge RECIPE.yml OUT`, as `mergekit-yaml config.yml OUT` is typed
        if a.output:
            raise SoupError(f"two outputs given: {a.inputs[1]} and -o {a.output}; give one")
        a.output = a.inputs.pop()
    if not a.output:
        raise SoupError("give the output: soup merge RECIPE.yaml OUT, or -o OUT")
    if a.json and not a.dry_run:
        raise SoupError("--json prints the estimate of a dry run; add --dry-run (or use soup plan)")
    device = _device(a)
    if a.as_adapter is not None or a.rank is not None:
        if a.dry_run or device.type != "cpu":
            raise SoupError(f"--{'dry-run' if a.dry_run else 'device'} does not apply to an adapter output (--as-adapter); leave it out")
        return _merge_as_adapter(a, is_recipe)
    mergekit_flags = [f for f in ("out_shard_size", "random_seed", "allow_crimes", *_NOT_NEEDED) if getattr(a, f) not in (None, False)]
    mergekit_flags += ["copy_tokenizer"] if a.copy_tokenizer is not None else []
    if is_recipe and len(a.inputs) == 1:
        _refuse_recipe_flags(a)
        if getattr(a, "data", None):
            raise SoupError("--data names the models of a command line; in a recipe file write each model's data as `data: FILE`")
        loaded, _ = read_recipe(a.inputs[0])
        if loaded is None:  # several documents: a multi-stage recipe
            if a.dry_run or device.type != "cpu":
                raise SoupError(f"{a.inputs[0]}: a multi-stage recipe has no --dry-run and merges on the CPU (its later stages read "
                                "the outputs of earlier ones, which do not exist yet); plan or merge each stage's recipe on its own")
            return _merge_stages(a)
        recipe = _mergekit_options(a, loaded)
        if a.allow_nonfinite:
            recipe = dataclasses.replace(recipe, allow_nonfinite=True)
    elif a.intermediate_dir:
        raise SoupError("--intermediate-dir is for a multi-stage recipe file (several --- separated documents with `name:`)")
    elif mergekit_flags:
        raise SoupError(f"--{mergekit_flags[0].replace('_', '-')} is a mergekit-yaml option, for a recipe file: soup merge RECIPE.yml OUT --{mergekit_flags[0].replace('_', '-')} ...")
    else:
        if not a.inputs:
            raise SoupError("give a recipe file (soup merge recipe.yaml -o OUT) or models (soup merge --method linear A B -o OUT)")
        weights = parse_weights(a.weights) if a.weights else None
        if weights is not None and len(weights) != len(a.inputs):
            raise SoupError(f"--weights has {len(weights)} values for {len(a.inputs)} models")
        data_of = _data_of(a, a.inputs)
        if data_of and not get_method(a.method or "linear").statistic:
            raise SoupError(f"--data is for the data-aware methods (fisher, regmean); method '{a.method or 'linear'}' does not use it")

        def ref(p: str, i: int | None) -> dict[str, Any]:
            r: dict[str, Any] = {"path": p}
            if i is not None and weights is not None:
                r["weight"] = weights[i]
            if i is not None and i in data_of:
                r["data"] = data_of[i]
            if a.key:
                r["key"] = a.key
            if a.strip_prefix:
                r["strip_prefix"] = a.strip_prefix
            return r

        data: dict[str, Any] = {"method": a.method or "linear", "models": [ref(p, i) for i, p in enumerate(a.inputs)], "parameters": parse_set(a.set)}
        for k in ("dtype", "keys", "seed"):
            if getattr(a, k) is not None:
                data[k] = getattr(a, k)
        if a.base:
            data["base"] = ref(a.base, None)
        if a.allow_nonfinite:
            data["allow_nonfinite"] = True
        output: dict[str, Any] = {}
        if a.shard_size:
            output["shard_size"] = a.shard_size
        if a.format:
            output["format"] = a.format
        if output:
            data["output"] = output
        recipe = recipe_from_dict(data, source="command line")
    recipe = _with_statistics(a, recipe)
    if a.dry_run:
        _print_estimate(a, merge(recipe, a.output, overwrite=a.overwrite, workers=a.workers, device=device, dry_run=True))
        return 0
    result = merge(recipe, a.output, overwrite=a.overwrite, workers=a.workers, progress=progress(a), hash_files=not a.no_hash, device=device)
    print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")
    return 0


def _data_of(a: argparse.Namespace, models: list[str]) -> dict[int, str]:
    """Model index -> its data file, from --data MODEL=FILE (or FILE per model, in order), checked against the models."""
    def where(p: str) -> Path:
        return Path(p).expanduser().absolute()

    given = getattr(a, "data", None) or []
    named = [d for d in given if "=" in d]
    if named and len(named) != len(given):
        raise SoupError("--data: give every model's data as MODEL=FILE, or one FILE per model in order; not both")
    if not named:
        if given and len(given) != len(models):
            raise SoupError(f"--data has {len(given)} file(s) for {len(models)} model(s); give one per model in order, or MODEL=FILE")
        return dict(enumerate(given))
    out: dict[int, str] = {}
    for item in named:
        model, _, file = item.partition("=")
        hits = [i for i, m in enumerate(models) if m == model or where(m).resolve() == where(model).resolve()]
        if len(hits) != 1:
            raise SoupError(f"--data {item}: {model!r} is {'none' if not hits else 'more than one'} of the models ({', '.join(models)}); "
                            "give the model as listed")
        out[hits[0]] = file
    return out


def _with_statistics(a: argparse.Namespace, recipe: Any) -> Any:
    """For fisher and regmean: the recipe with every model's statistics computed (or found in the cache) from its data."""
    from ..methods import get_method

    method = get_method(recipe.method)
    pending = [m.label() for m in recipe.models if m.statistics is None and m.data_resolved is not None]
    if method.statistic is None or not pending:
        return recipe
    if a.dry_run:
        raise SoupError(f"a dry run computes nothing, and the statistics of {', '.join(pending)} are not computed yet: run the merge, "
                        "or give their files as `statistics:` (soup statistics)")
    from ..recipes.statistics import recipe_statistics

    def evaluator_for(i: int, file: Path) -> Any:
        return _evaluator_for(a, recipe.models[i].resolved, file)

    return recipe_statistics(recipe, evaluator_for, kind=a.fisher, cache_dir=a.statistics_cache, use_cache=not a.no_statistics_cache,
                             progress=progress(a))


# The output `soup plan` estimates for when none is given: a name in the working folder (nothing is written).
PLAN_OUTPUT = "merged"


def cmd_plan(a: argparse.Namespace) -> int:
    """``soup plan``: ``soup merge --dry-run`` with the output optional (the working folder's disk is estimated then)."""
    a.dry_run = True
    is_recipe = bool(a.inputs) and a.method is None and Path(a.inputs[0]).suffix.lower() in (".yaml", ".yml")
    if not a.output and not (is_recipe and len(a.inputs) == 2):
        a.output = PLAN_OUTPUT
    return cmd_merge(a)


def _refuse_recipe_flags(a: argparse.Namespace) -> None:
    """Flags that a recipe file says for itself, refused beside one."""
    flags = [f for f in ("base", "weights", "set", "dtype", "keys", "seed", "shard_size", "format", "key", "strip_prefix") if getattr(a, f)]
    if flags:
        raise SoupError(f"--{flags[0].replace('_', '-')} cannot be combined with a recipe file; put it in {a.inputs[0]}")


def _print_modules(result: Any, output: str) -> None:
    """Each truncated module's rank, retained energy and relative error, the least energy first (10 of them beyond 20)."""
    ranked = sorted(((m, v) for m, v in result.modules.items() if "retained_energy" in v), key=lambda kv: kv[1]["retained_energy"])
    for module, v in ranked if len(ranked) <= 20 else ranked[:10]:
        print(f"  {module}: rank {int(v['rank'])}, retained energy {v['retained_energy']:.4f}, relative error {v['relative_error']:.3g}")
    if len(ranked) > 20:
        print(f"  ... {len(ranked) - 10} more modules that keep more energy (all in {Path(output) / 'soup_manifest.json'})")


def _print_adapter(result: Any, output: str) -> None:
    _print_modules(result, output)
    extra = f", largest relative error of the truncation {result.worst_error:.3g}" if any("relative_error" in v for v in result.modules.values()) else ""
    print(f"wrote {result.output} (PEFT adapter, {len(result.modules)} modules, rank {result.rank}{extra}, {result.seconds:.1f} s)")


def _merge_as_adapter(a: argparse.Namespace, is_recipe: bool) -> int:
    """``soup merge --base B AD1 AD2 --as-adapter cat|svd|linear -o OUT``: the result is a PEFT adapter."""
    from ..adapters import merge_adapters

    if a.as_adapter is None:
        raise SoupError("--rank is the output rank of --as-adapter svd; add --as-adapter svd")
    if is_recipe:  # a recipe whose models are all adapters of one base (e.g. the recipe.yaml of an adapter soup)
        from ..adapters import recipe_adapter
        from ..recipe import read_recipe

        _refuse_recipe_flags(a)
        recipe, _ = read_recipe(a.inputs[0])
        if recipe is None:
            raise SoupError(f"{a.inputs[0]}: a multi-stage recipe cannot be written as one adapter")
        if a.as_adapter == "linear":
            raise SoupError("a recipe is written as an adapter by cat or svd (--as-adapter linear is peft's factor-wise combination of adapter folders)")
        _print_adapter(recipe_adapter(recipe, a.output, combination=a.as_adapter, rank=a.rank, overwrite=a.overwrite, progress=progress(a),
                                      hash_files=not a.no_hash), a.output)
        return 0
    if not a.base:
        raise SoupError("--as-adapter needs --base: the model the adapters were trained on")
    unused = [f for f in ("dtype", "keys", "shard_size", "format", "key", "strip_prefix") if getattr(a, f)]
    if unused:
        raise SoupError(f"--{unused[0].replace('_', '-')} does not apply to an adapter output (--as-adapter)")
    weights = parse_weights(a.weights) if a.weights else None
    result = merge_adapters(a.inputs, a.output, base=a.base, combination=a.as_adapter, method=a.method or "linear", weights=weights,
                            parameters=parse_set(a.set), rank=a.rank, seed=a.seed or 0, overwrite=a.overwrite, progress=progress(a),
                            hash_files=not a.no_hash)
    _print_adapter(result, a.output)
    return 0


def cmd_extract_lora(a: argparse.Namespace) -> int:
    from ..adapters import extract_lora

    result = extract_lora(a.finetuned, a.output, base=a.base, rank=a.rank, others=a.others, overwrite=a.overwrite, progress=progress(a),
                          hash_files=not a.no_hash)
    _print_modules(result, a.output)
    for n in result.full:
        print(f"  {n}: saved whole")
    print(f"wrote {result.output} (PEFT adapter, {len(result.modules)} LoRA modules, {len(result.full)} tensors saved whole, {result.seconds:.1f} s)")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    import tempfile

    from ..recipe import describe, read_recipe
    from ..recipe.stages import load_stages

    recipe, text = read_recipe(a.recipe)
    if recipe is None:
        stages = load_stages(text, a.recipe, Path(tempfile.gettempdir()) / "soup-stages")
        print(f"{a.recipe}: valid, {len(stages)} stages, run in this order")
        for st in stages:
            print(f"\n## stage {st.name or '(final, unnamed)'}" + (f" (uses {', '.join(sorted(st.uses))})" if st.uses else ""))
            print(describe(st.recipe))
        return 0
    print(f"{a.recipe}: valid")
    print(describe(recipe))
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from ..methods import available_methods, get_method

    methods = [get_method(a.name)] if a.name else available_methods()
    for m in methods:
        need = {"required": "needs a base", "optional": "base optional", "none": "no base"}[m.base]
        count = f"{m.min_models}" + ("+" if m.max_models is None else ("" if m.max_models == m.min_models else f"-{m.max_models}"))
        data = f"; each model's {m.statistic} statistics from its own data (--data MODEL=FILE)" if m.statistic else ""
        print(f"{m.name}  ({need}; {count} models{'; random, seeded per tensor' if m.random else ''}{data})")
        print(f"    {m.summary}")
        print(f"    paper: {m.paper}")
        for p in m.params:
            alias = f" (alias: {', '.join(p.aliases)})" if p.aliases else ""
            per = " [per model]" if p.per_model else ""
            print(f"    - {p.name} = {p.default!r}{per}  {p.describe_range()}{alias}: {p.help}")
        print()
    return 0


def _data_options(dg: Any, *, per_model: bool = True) -> None:
    """How a model's own data is read and run, for the statistics of fisher and regmean (soup merge, soup statistics)."""
    if per_model:
        dg.add_argument("--data", action="append", metavar="MODEL=FILE",
                        help="a model's own data (CSV/JSONL for text classification, or what your --eval takes), repeatable; or FILE once per model, in order")
    dg.add_argument("--eval", default="text-classification", help="how the data is read and the model run: text-classification (default; "
                    "the model's own folder, or --model, gives architecture and tokenizer) or your file.py:Evaluator / package.module:Evaluator")
    dg.add_argument("--model", metavar="FOLDER", help="Hugging Face folder giving architecture and tokenizer (default: each model's own folder)")
    dg.add_argument("--text-column", help="text column (default text)")
    dg.add_argument("--label-column", help="label column (default label)")
    dg.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    dg.add_argument("--batch-size", type=int, help="examples per forward pass")
    dg.add_argument("--limit", type=int, help="use only the first N rows of each model's data")
    dg.add_argument("--fisher", choices=["empirical", "sampled"], default="empirical",
                    help="fisher: labels from the data (empirical, default) or drawn from the model's predictions (sampled)")
    dg.add_argument("--statistics-cache", metavar="DIR", help="where statistics are kept (default <modelsoup cache>/statistics)")
    dg.add_argument("--no-statistics-cache", action="store_true", help="compute the statistics again (and replace the cached ones)")


def _evaluator_for(a: argparse.Namespace, model: Path | None, file: Path) -> Any:
    """The evaluator that runs ``model`` on ``file`` as the data options say.

    Raises:
        SoupError: a custom ``--eval`` that would not read ``file`` (an Evaluator object, or a class that takes no data
            path: every model's statistics would come from one dataset), or built-in options given to it.
    """
    import inspect

    from ..eval.base import Evaluator, load_object
    from ..eval.factory import BUILTINS, make_evaluators

    if a.eval not in BUILTINS:
        given = [f"--{k.replace('_', '-')}" for k in ("text_column", "label_column", "max_length", "batch_size", "limit") if getattr(a, k) is not None]
        if given:
            raise SoupError(f"{', '.join(given)} are options of the built-in evaluators; your --eval {a.eval} reads its data itself")
        obj = load_object(a.eval)
        try:
            takes = isinstance(obj, type) and issubclass(obj, Evaluator) and any(
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            takes = False
        if not takes:
            raise SoupError(f"--eval {a.eval}: each model's statistics come from its own --data file, so give an Evaluator class whose "
                            f"constructor takes the data path (a {type(obj).__name__} with its own data would give every model the same data)")

    folder = a.model or (str(model) if model is not None and (model / "config.json").is_file() else None)
    held, _ = make_evaluators(a.eval, heldout=str(file), model=folder, text_column=a.text_column, label_column=a.label_column,
                              max_length=a.max_length, batch_size=a.batch_size, limit=a.limit, progress=progress(a))
    return held


def cmd_statistics(a: argparse.Namespace) -> int:
    from ..io.output import check_output
    from ..recipes.statistics import model_statistics

    out = Path(a.output)
    if out.suffix != ".safetensors":
        raise SoupError(f"-o {a.output}: statistics are written as one .safetensors file; give a name ending in .safetensors")
    data = Path(a.data).expanduser()
    if not data.exists():
        raise SoupError(f"--data {a.data}: no such file")
    check_output(out, a.overwrite, inputs=[Path(a.model_path), data], as_file=True)
    path = model_statistics(a.model_path, _evaluator_for(a, Path(a.model_path), data), a.kind, kind=a.fisher, output=out,
                            cache_dir=a.statistics_cache, use_cache=not a.no_statistics_cache, progress=progress(a))
    print(f"wrote {path} ({a.kind} statistics of {a.model_path} on {a.data}); use it as `statistics:` of this model in a {('fisher' if a.kind == 'fisher' else 'regmean')} recipe")
    return 0


def _merge_arguments(m: argparse.ArgumentParser, *, output_help: str) -> None:
    """The arguments of ``soup merge``, which ``soup plan`` takes too."""
    m.add_argument("inputs", nargs="*", help="a recipe file (native or mergekit YAML) and optionally the output, or the models to merge")
    m.add_argument("-o", "--output", help=output_help)
    m.add_argument("--method", help="merge method (see `soup methods`); default linear")
    m.add_argument("--base", help="base / pre-trained model")
    m.add_argument("--weights", help="comma-separated weight per model")
    m.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method parameter, repeatable")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the inputs')")
    m.add_argument("--keys", choices=["exact", "intersection", "base"], help="tensor names not in every model: refuse (exact, default), leave out, or take from base")
    m.add_argument("--seed", type=int, help="seed of random methods (dare)")
    m.add_argument("--shard-size", help="largest output shard, e.g. 5GB")
    m.add_argument("--format", choices=["safetensors", "torch"], help="output format of a folder output")
    m.add_argument("--key", help="entry of nested torch checkpoints holding the weights (state_dict, ema, ...)")
    m.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge inputs holding NaN/Inf instead of refusing")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.add_argument("--workers", type=int, help="threads (default: cores + 1, 2..8)")
    m.add_argument("--device", help="where each tensor is merged: cpu (default), cuda, cuda:N; reading and writing stay on the CPU")
    m.add_argument("--dry-run", action="store_true", help="print what the merge would read, write, hold in memory, need on disk and take; write nothing")
    m.add_argument("--json", action="store_true", help="with --dry-run (and soup plan): print the estimate as JSON")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--no-hash", action="store_true", help="skip sha256 of inputs and outputs")
    m.add_argument("--intermediate-dir", "-I", metavar="DIR",
                   help="multi-stage recipe: write the named stages to DIR/<name> and keep them (default: a temporary folder, removed)")
    _data_options(m.add_argument_group("data-aware methods (fisher, regmean): each model's statistics from its own data, cached by weights and data"))
    ad = m.add_argument_group("adapters (PEFT LoRA folders among the models are applied to --base)")
    ad.add_argument("--as-adapter", choices=["cat", "svd", "linear"],
                    help="write a PEFT adapter instead of a full model: cat (exact, rank = sum of ranks), svd (the merged delta "
                         "truncated to --rank), linear (peft's factor-wise combination, same rank only; not the mean of the updates)")
    ad.add_argument("--rank", type=int, help="output rank of --as-adapter svd (default: the largest input rank)")
    mk = m.add_argument_group("mergekit-yaml options (with a recipe file; mergekit's meaning)")
    mk.add_argument("--out-shard-size", metavar="SIZE", help="largest output shard in bytes, K/M/B suffixes as mergekit reads them (5B = 5e9)")
    mk.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=None,
                    help="copy the tokenizer files to the output (default: yes)")
    mk.add_argument("--random-seed", type=int, help="seed of random methods (the recipe's seed)")
    mk.add_argument("--allow-crimes", action="store_true", help="accepted; not needed (tensor names and shapes are checked either way)")
    mk.add_argument("--cuda", action="store_true", help="compute on the GPU: the same as --device cuda")
    for flag in _NOT_NEEDED:
        mk.add_argument(f"--{flag.replace('_', '-')}", action="store_true", help="accepted; not needed here")


def add_parsers(sub: Any) -> None:
    """Add this module's subcommands."""
    m = sub.add_parser("merge", help="merge checkpoints (a recipe file, or models and flags)",
                       description="soup merge RECIPE.yaml -o OUT   |   soup merge --method ties --base B A1 A2 -o OUT --set density=0.5")
    _merge_arguments(m, output_help="output folder (HF layout) or file (.safetensors / .pt)")
    m.set_defaults(fn=cmd_merge)

    pl = sub.add_parser("plan", help="what a merge will cost, before running it: bytes, memory, disk, tensors, time (soup merge --dry-run)",
                        description="soup plan RECIPE.yaml [OUT]   |   soup plan --method ties --base B A1 A2 [-o OUT]: takes what soup merge "
                                    "takes, plans the merge, times a small sample of its tensors, and writes nothing")
    _merge_arguments(pl, output_help=f"the output the merge would write (its disk is checked; default ./{PLAN_OUTPUT})")
    pl.set_defaults(fn=cmd_plan)

    x = sub.add_parser("extract-lora", help="extract a PEFT LoRA adapter from a full fine-tune (rank-R SVD of FT - BASE per linear weight)",
                       description="soup extract-lora FT --base B --rank 16 -o OUT: per 2-D weight that changed, the rank-R SVD of "
                                   "FT - B as a LoRA module; the retained energy of each is printed.")
    x.add_argument("finetuned", help="the full fine-tune")
    x.add_argument("--base", required=True, help="the model it was fine-tuned from")
    x.add_argument("--rank", type=int, required=True, help="rank of every extracted module")
    x.add_argument("-o", "--output", required=True, help="the adapter folder to write")
    x.add_argument("--others", choices=["save", "refuse"], default="save",
                   help="changed tensors that are not 2-D weights (norms, biases): save them whole (default) or refuse")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.add_argument("--no-hash", action="store_true", help="skip sha256 of the inputs")
    x.set_defaults(fn=cmd_extract_lora)

    st = sub.add_parser("statistics", help="a model's Fisher or input Grams on its own data, for `method: fisher` / `regmean` (`statistics:`)",
                        description="soup statistics MODEL --data FILE --kind fisher|gram -o STATS.safetensors (soup merge --data computes them itself)")
    st.add_argument("model_path", metavar="MODEL", help="the model (file or folder)")
    st.add_argument("--data", required=True, help="its own data")
    st.add_argument("--kind", choices=["fisher", "gram"], required=True, help="fisher (diagonal Fisher, for fisher) or gram (linear inputs' X^T X, for regmean)")
    st.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    st.add_argument("--overwrite", action="store_true", help="replace an earlier statistics file")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    _data_options(st, per_model=False)
    st.set_defaults(fn=cmd_statistics)

    v = sub.add_parser("validate", help="check a recipe without merging")
    v.add_argument("recipe")
    v.set_defaults(fn=cmd_validate)

    ms = sub.add_parser("methods", help="list merge methods with their parameters, defaults and papers")
    ms.add_argument("name", nargs="?")
    ms.set_defaults(fn=cmd_methods)
