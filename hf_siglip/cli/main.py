"""The `hf-siglip` command (also `python -m hf_siglip`).

    hf-siglip train [--config recipe.yaml] [--field value ...]   train (no arguments: the embedded demo)
    hf-siglip eval  [--config recipe.yaml] --checkpoint DIR      retrieval, zero-shot, few-shot probe
    hf-siglip caption --checkpoint DIR                            captions for held-out images, BLEU-4 and CIDEr
    hf-siglip convert SRC DST --bottleneck-dim K                  native SigLIP -> bottleneck embeddings
    hf-siglip push CHECKPOINT REPO_ID                             upload with processor and model card
    hf-siglip shards SRC DST [--rows-per-shard N]                 write a dataset as webdataset tar shards

A mistake in the flags, the recipe, a path or the data's layout prints one line, `hf-siglip <command>: error: ...`
(every problem found, one line each), and exits with status 2; a run that fails (a diverged loss, corrupt weights)
exits with 1. `--debug` (or HF_SIGLIP_DEBUG=1) shows the traceback.
    hf-siglip recipes [--path NAME]                               the packaged recipes (--config NAME), or one's file
"""

import argparse
import dataclasses
import difflib
import os
import re
import sys

import yaml

from ..errors import HfSiglipError, UsageError, error_message

# Fields of earlier releases that became data steps: a recipe or flag using one gets told where it went.
_MOVED_TO_DATA_STEPS = {
    "captions_per_image": '{"caption_sampling": {"k": K}}',
    "pseudo_caption_model": '{"pseudo_captions": {"model": PATH}}',
    "num_pseudo_captions": '{"pseudo_captions": {"num_captions": N}}',
    "cat_filter": '{"cat_filter": {}}', "cat_min_complexity": '{"cat_filter": {"min_complexity": N}}',
    "cat_require_action": '{"cat_filter": {"require_action": BOOL}}',
    "cat_text_spotting": '{"cat_filter": {"text_spotting": BOOL}}',
    "cache_image_embeddings": '{"image_embedding_cache": {}}',
    "label_noise": '{"label_noise": {"image": P, "text": P, "pairing": P}}',
}


# Fields of earlier releases that were renamed: the new form, in one line.
_RENAMED_FIELDS = {
    "loss_options": "loss_config, a typed mapping (hf_siglip.SiglipLossConfig), e.g. loss_config: {normalize: row} "
                    "in a recipe or --loss_config '{\"normalize\": \"row\"}' (hard_negative_beta is now "
                    "sigmoid_hard_negative_beta)",
}


def _moved_field_problems(names) -> list[str]:
    """One problem per renamed field, and one for all fields that became data steps."""
    names = list(names)
    problems = [f"{name} is now {_RENAMED_FIELDS[name]}" for name in names if name in _RENAMED_FIELDS]
    moved = [name for name in names if name in _MOVED_TO_DATA_STEPS]
    if moved:
        hints = "; ".join(f"{name} -> data_steps entry {_MOVED_TO_DATA_STEPS[name]}" for name in moved)
        problems.append(f"{moved} are data steps now: list them under data_steps (a recipe) or --data_steps "
                        f"'[...]' (JSON). {hints}")
    return problems


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _value_problem(action, value) -> str | None:
    """Why `value` (a flag's string, or a recipe's YAML value) cannot be `action`'s field, or None if it can.
    Stricter than argparse, which would take 16.5 from a recipe as an integer field's value."""
    from transformers.hf_argparser import string_to_bool

    items = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
    for item in items:
        if item is None:
            continue
        shown = item if isinstance(item, str) else repr(item)
        kind, text = action.type, isinstance(item, str)
        if kind is int and (isinstance(item, bool) or not (isinstance(item, int) or text and _parses(int, item))):
            return f"{action.dest} must be an integer, got {shown}"
        if kind is float and (isinstance(item, bool) or not (isinstance(item, (int, float)) or text
                                                               and _parses(float, item))):
            return f"{action.dest} must be a number, got {shown}"
        if kind is string_to_bool and not (isinstance(item, bool) or text and _parses(string_to_bool, item)):
            return f"{action.dest} must be true or false, got {shown}"
        if action.choices and str(item) not in {str(choice) for choice in action.choices}:
            return (f"{action.dest} must be one of {[str(choice) for choice in action.choices]}, got {shown}"
                    + _did_you_mean(str(item), map(str, action.choices)))
    return None


def _parses(kind, text: str) -> bool:
    try:
        kind(text)
        return True
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def _checked_argv(parser, argv: list[str], problems: list[str]) -> list[str]:
    """`argv` without the flags that cannot be parsed: each unknown flag (with the close match, if any), moved
    field or bad value becomes one entry of `problems` instead of an error that hides the others."""
    options = parser._option_string_actions
    moved = set(_RENAMED_FIELDS) | set(_MOVED_TO_DATA_STEPS)
    kept, index = [], 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            kept.append(token)  # a stray value: argparse says what is wrong with it
            index += 1
            continue
        name, equals, inline = token.partition("=")
        end = index + 1
        if not equals:
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
        values = [inline] if equals else argv[index + 1:end]
        action = options.get(name)
        if name[2:] in moved:
            pass  # reported with the other moved fields
        elif action is None:
            problems.append(f"unknown flag {name}{_did_you_mean(name, (o for o in options if o.startswith('--')))}")
        elif action.nargs is None and len(values) == 1 and _value_problem(action, values[0]):
            problems.append(_value_problem(action, values[0]))
        elif action.nargs in ("+", "*") and values and _value_problem(action, values):
            problems.append(_value_problem(action, values))
        else:
            kept += argv[index:end]
        index = end
    return kept


def _read_recipe(config_path: str, problems: list[str]) -> dict:
    """The recipe's fields, or {} with the reason in `problems` (a missing file, YAML that does not parse, not a
    mapping)."""
    try:
        with open(config_path) as file:
            loaded = yaml.safe_load(file)
    except FileNotFoundError:
        problems.append(f"--config {config_path}: no such file")
        return {}
    except OSError as error:
        problems.append(f"--config {config_path}: cannot be read ({error.strerror or error})")
        return {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        problems.append(f"--config {config_path}:{where}: not valid YAML ({reason})")
        return {}
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"--config {config_path}: a recipe is a mapping of field: value, got "
                        f"{type(loaded).__name__}")
        return {}
    return loaded


def _recipe_values(parser, config_path: str, problems: list[str]) -> dict:
    """The recipe's usable fields; an unknown key (with the close match), a moved field or a value of the wrong
    type becomes one entry of `problems` each."""
    loaded = _read_recipe(config_path, problems)
    problems += _moved_field_problems(loaded)
    fields = {}
    for action in parser._actions:  # a bool field's `--no_x` comes after `--x`: keep the first
        if action.dest not in ("help", "config"):
            fields.setdefault(action.dest, action)
    values = {}
    for key, value in loaded.items():
        if key in _RENAMED_FIELDS or key in _MOVED_TO_DATA_STEPS:
            continue
        if key in fields and isinstance(value, bool) and fields[key].choices and \
                {"no", "yes"} & {str(choice) for choice in fields[key].choices}:
            value = "yes" if value else "no"  # YAML reads an unquoted `save_strategy: no` as false
        if key not in fields:
            problems.append(f"--config {config_path}: unknown field {key}{_did_you_mean(str(key), fields)}")
        elif _value_problem(fields[key], value):
            problems.append(f"--config {config_path}: {_value_problem(fields[key], value)}")
        else:
            values[key] = value
    return values


def _raise_usage_error(message: str):
    raise UsageError(message)


def parse_with_config(dataclass_types, argv: list[str], defaults: dict | None = None, prog: str = "hf-siglip",
                      problems: list[str] | None = None):
    """TRL-style parsing: built-in `defaults` < YAML file given by `--config` < command-line flags.

    Every problem found (unknown flags and recipe keys with their close matches, values of the wrong type, moved
    fields, a missing or unreadable recipe, errors raised while the dataclasses are built) is collected: with a
    `problems` list they are appended to it and the dataclasses that could not be built are None; without one,
    they are raised together as one `UsageError`."""
    from transformers import HfArgumentParser

    collected = []
    # allow_abbrev=False: argparse would otherwise take `--learning_rat 0.1` for `--learning_rate`
    parser = HfArgumentParser([], prog=prog, allow_abbrev=False)
    parser.error = _raise_usage_error  # one line, not argparse's usage block of ~200 flags
    parser.add_argument("--config", default=None, help="YAML recipe whose keys are any of the fields below: a "
                        "packaged recipe's name (`hf-siglip recipes` lists them) or a file; flags override it")
    parser.dataclass_types = list(dataclass_types)
    for dtype in dataclass_types:  # each in its own help group (the class's `_argument_group_name`)
        parser._add_dataclass_arguments(dtype)
    _move_generic_trainer_fields_last(parser, dataclass_types)
    config_reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_reader.add_argument("--config", default=None)
    config_reader.error = _raise_usage_error
    config_path = config_reader.parse_known_args(argv)[0].config
    if config_path:
        from ..recipes import RecipeNotFoundError, recipe_path

        try:
            config_path = recipe_path(config_path)  # a file as given, or the name of a packaged recipe
        except RecipeNotFoundError as error:  # reported with the other problems
            collected.append(str(error))
            config_path = None
    collected += _moved_field_problems(arg[2:].split("=")[0] for arg in argv if arg.startswith("--"))
    values = dict(defaults or {})
    if config_path:
        values.update(_recipe_values(parser, config_path, collected))
    argv = _checked_argv(parser, argv, collected)
    parser.set_defaults(**values)
    objects = [None] * len(dataclass_types)
    try:
        namespace, remaining = parser.parse_known_args(args=argv)
        collected += [f"unexpected argument {arg}" for arg in remaining]
    except UsageError as error:
        collected += error.problems
        namespace = None
    for index, dtype in enumerate(dataclass_types if namespace is not None else ()):
        keys = {field.name for field in dataclasses.fields(dtype) if field.init}
        try:
            objects[index] = dtype(**{key: value for key, value in vars(namespace).items() if key in keys})
        except UsageError as error:
            collected += error.problems
        except (ValueError, TypeError) as error:  # a dataclass's own checks (loss_config, data_steps...)
            collected.append(error_message(error))
    if problems is not None:
        problems += collected
    elif collected:
        raise UsageError(collected)
    return tuple(objects)


def _move_generic_trainer_fields_last(parser, dataclass_types) -> None:
    """`--help` shows the SigLIP fields first and the ~100 generic `transformers.TrainingArguments` fields in a
    last group of their own."""
    from transformers import TrainingArguments

    ours = {name for dtype in dataclass_types if issubclass(dtype, TrainingArguments)
            for name in dtype.__dict__.get("__annotations__", {})}
    generic = {field.name for field in dataclasses.fields(TrainingArguments)} - ours
    if not ours:
        return
    trainer_group = parser.add_argument_group("Trainer fields (transformers.TrainingArguments)")
    for group in parser._action_groups[:-1]:
        moved = [action for action in group._group_actions if action.dest in generic]
        for action in moved:
            group._group_actions.remove(action)
            trainer_group._group_actions.append(action)


def _train(argv: list[str]) -> int:
    from ..training.launching import prepare_cpu_torchrun

    prepare_cpu_torchrun()  # before the arguments set up devices: torchrun on CPU gets gloo processes
    from ..training.training_args import SiglipTrainingArguments
    from .arguments import DEMO_TRAINING_DEFAULTS, SiglipModelArguments, SiglipScriptArguments, configuration_problems

    problems = []  # every problem of the flags, the recipe and the configuration, in one report
    script_args, model_args, training_args = parse_with_config(
        (SiglipScriptArguments, SiglipModelArguments, SiglipTrainingArguments), argv,
        defaults=DEMO_TRAINING_DEFAULTS, prog="hf-siglip train", problems=problems)
    problems += configuration_problems(script_args, model_args, training_args)
    if problems:
        raise UsageError(problems)
    from ..evaluation import format_metrics  # the heavy imports only once the arguments parse (--help stays quick)
    from .train import run_train

    metrics = run_train(script_args, model_args, training_args)
    if training_args.process_index == 0:  # one report, also under accelerate launch
        if metrics:
            print(f"Evaluation ({script_args.dataset}, held-out split):\n{format_metrics(metrics)}")
        print(f"Saved model, processor, model card and training curves to {training_args.output_dir}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a clean exit: a gloo process that leaves with its group alive can abort in its threads at shutdown
        # ("terminate called without an active exception"), failing the launch after the work is done
        dist.destroy_process_group()
    return 0


def _eval(argv: list[str]) -> int:
    from ..evaluation import format_metrics, to_json
    from .evaluate import SiglipEvalArguments, eval_problems, evaluation_summary, run_eval

    problems = []
    (args,) = parse_with_config((SiglipEvalArguments,), argv, prog="hf-siglip eval", problems=problems)
    if args is not None:
        problems += eval_problems(args)
    if problems:
        raise UsageError(problems)
    metrics = run_eval(args)
    print(f"{evaluation_summary(args, metrics)}\n{format_metrics(metrics)}")  # first line: what it evaluated on
    if args.output_file:
        to_json(metrics, args.output_file)  # full precision
        print(f"Metrics written to {args.output_file}")
    return 0


def _caption(argv: list[str]) -> int:
    from ..evaluation import format_metrics
    from .caption import SiglipCaptionArguments, caption_problems, run_caption, write_captions

    problems = []
    (args,) = parse_with_config((SiglipCaptionArguments,), argv, prog="hf-siglip caption", problems=problems)
    if args is not None:
        problems += caption_problems(args)
    if problems:
        raise UsageError(problems)
    metrics, rows = run_caption(args)
    output_dir = args.output_dir or os.path.join(args.checkpoint, "captions")
    write_captions(output_dir, metrics, rows)
    print(f"Captioned {len(rows):,} images of {args.dataset}, split '{args.eval_split}', with {args.captioner} "
          f"(settings from {args.evaluated_from})")
    for row in rows[:3]:
        print(f"  {row['generated']!r}  (references: {row['references'][:2]})")
    print(f"{format_metrics(metrics, legend=False)}\nCaptions and metrics written to {output_dir}")
    return 0


def _require_existing(path: str, what: str) -> None:
    """A local-looking path that does not exist: one line at once, not the Hub's retries (hf_siglip.paths)."""
    from ..paths import missing_local_path

    problem = missing_local_path(path, what)
    if problem:
        raise UsageError(problem)


def _convert(args: argparse.Namespace) -> int:
    from ..convert import convert_to_bottleneck

    _require_existing(args.src, "src")
    _, result = convert_to_bottleneck(args.src, args.dst, args.bottleneck_dim)
    saved = result.parameters_before - result.parameters_after
    print(
        f"Converted {args.src} -> {args.dst}: token table {result.vocab_size} x {result.hidden_size} -> "
        f"{result.vocab_size} x {result.bottleneck_dim} + {result.bottleneck_dim} x {result.hidden_size}\n"
        f"relative reconstruction error ||E - E_K||_F / ||E||_F = {result.relative_error:.6f}\n"
        f"parameters: {result.parameters_before:,} -> {result.parameters_after:,} ({saved:,} fewer)"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..hub import check_hub_access

    check_hub_access()  # before the model is loaded: one line if the Hub cannot be reached
    _require_existing(args.checkpoint, "checkpoint")
    from transformers import AutoProcessor

    from ..dual_encoders import load_dual_encoder
    from ..hub import push_to_hub

    model = load_dual_encoder(args.checkpoint)  # SigLIP (native or ours), SigLIP 2, CLIP: saved in their own format
    try:
        processor = AutoProcessor.from_pretrained(args.checkpoint)
    except (OSError, ValueError, TypeError):
        processor = None
    commit = push_to_hub(
        model,
        args.repo_id,
        processor,
        private=args.private,
        base_model=args.base_model,
        datasets=args.dataset,
        license=args.license,
        from_folder=args.checkpoint,  # the card hf-siglip train saved there (metrics, settings), if any
    )
    print(f"Pushed {args.checkpoint} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    import os

    _require_existing(args.src, "src")
    from ..data import load_image_text_dataset
    from ..data.shards import write_webdataset_shards

    splits = load_image_text_dataset(args.src, split=None, image_column=args.image_column,
                                     caption_column=args.caption_column)
    splits = splits if hasattr(splits, "items") else {"train": splits}  # a save_to_disk Dataset: one split
    for name, part in splits.items():  # one split: DST holds its shards; several: DST/<split>/
        folder = args.dst if len(splits) == 1 else os.path.join(args.dst, name)
        paths = write_webdataset_shards(part, folder, rows_per_shard=args.rows_per_shard,
                                        image_column=args.image_column, caption_column=args.caption_column)
        print(f"{name}: {len(part):,} rows -> {len(paths)} shard(s) in {folder}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from ..recipes import accelerate_config_names, accelerate_config_path, describe, recipe_path

    if args.path is None:
        print(describe())
    elif args.path in accelerate_config_names():
        print(accelerate_config_path(args.path))
    else:
        print(recipe_path(args.path, flag="--path"))
    return 0


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UsageError`: `main` prints it as one line (no usage block)."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="hf-siglip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # train and eval parse their own (many) flags with HfArgumentParser: `hf-siglip train --help`
    commands.add_parser("train", help="Train (no arguments: the embedded demo). YAML recipes via --config.",
                        add_help=False)
    commands.add_parser("eval", help="Evaluate a checkpoint: retrieval recall@k, zero-shot, few-shot probe.",
                        add_help=False)
    commands.add_parser("caption", help="Caption held-out images with a trained captioner; BLEU-4 and CIDEr.",
                        add_help=False)

    convert = commands.add_parser(
        "convert", help="Turn a native SigLIP checkpoint into one with bottleneck token embeddings (truncated SVD)."
    )
    convert.add_argument("src", help="native SigLIP checkpoint folder (or Hub id)")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--bottleneck-dim", type=int, required=True, help="K, the bottleneck width (paper: 96)")
    convert.set_defaults(func=_convert)

    push = commands.add_parser("push", help="Upload a checkpoint folder with its processor and a model card.")
    push.add_argument("checkpoint", help="folder written by save_pretrained / hf-siglip train")
    push.add_argument("repo_id", help="Hub repository, e.g. you/siglip-demo")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--base-model", default=None, help="model card metadata: the checkpoint fine-tuned from")
    push.add_argument("--dataset", action="append", default=None, help="model card metadata (repeatable)")
    push.add_argument("--license", default="apache-2.0", help="model card license (default apache-2.0)")
    push.set_defaults(func=_push)

    shards = commands.add_parser(
        "shards", help="Write a dataset (an imagefolder, parquet, save_to_disk folder...) as webdataset .tar shards in "
                       "img2dataset's layout, each split in its own folder; `train --dataset DST` streams them.")
    shards.add_argument("src", help="anything `hf-siglip train --dataset` reads (not shards)")
    shards.add_argument("dst", help="output folder")
    shards.add_argument("--rows-per-shard", type=int, default=1000, help="rows per .tar (default 1000)")
    shards.add_argument("--image-column", default="image")
    shards.add_argument("--caption-column", default="caption")
    shards.set_defaults(func=_shards)

    recipes = commands.add_parser("recipes", help="List the recipes that ship with hf_siglip (train --config NAME) "
                                                  "and the accelerate configs, each with its purpose.")
    recipes.add_argument("--path", metavar="NAME", default=None,
                         help="print the file of one recipe or accelerate config instead")
    recipes.set_defaults(func=_recipes)
    return parser


_COMMANDS = ("train", "eval", "caption", "convert", "push", "shards", "recipes")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (`UsageError`, Hub access) prints `hf-siglip <command>: error: <message>` and
    returns 2; a run that fails for a reason the user can act on (another `HfSiglipError`: a diverged run, corrupt
    weights; a peer that stopped answering) prints the same way and returns 1; anything else keeps its traceback.
    `--debug` anywhere on the command line (or HF_SIGLIP_DEBUG=1) shows the traceback of every error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # a bare --debug is ours; `--debug underflow_overflow` stays TrainingArguments' own field
    ours = [i for i, arg in enumerate(argv) if arg == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-"))]
    debug = bool(ours) or os.environ.get("HF_SIGLIP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    argv = [arg for i, arg in enumerate(argv) if i not in ours]
    prog = f"hf-siglip {argv[0]}" if argv and argv[0] in _COMMANDS else "hf-siglip"
    try:
        if argv and argv[0] in ("train", "eval", "caption"):  # their many flags: HfArgumentParser
            return {"train": _train, "eval": _eval, "caption": _caption}[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Exception as error:
        # one line, no traceback, for errors a user acts on (hf_siglip.errors; HubAccessError is matched by name:
        # importing hf_siglip.hub here would slow down --help); any other error keeps its traceback
        timed_out = "torch.distributed" in sys.modules and _is_collective_timeout(error)
        usage = isinstance(error, UsageError) or type(error).__name__ == "HubAccessError"
        if debug or not (usage or timed_out or isinstance(error, HfSiglipError)):
            raise
        message = error_message(error)
        if timed_out:  # a frozen, stopped or dead peer: this process gives up after the group's timeout
            reason = re.sub(r"^\[[^]]*\]\s*", "", str(error).splitlines()[0])  # gloo's source location first
            message = (f"another process did not answer within --ddp_timeout (it froze, stopped, died or ran out of "
                       f"memory); this process stops too. {reason}")
        sys.stderr.write(f"{prog}: error: {message}\n")  # one write: processes sharing stderr do not interleave
        sys.stderr.flush()
        _end_process_group()
        return 2 if usage else 1


def _is_collective_timeout(error: BaseException) -> bool:
    from ..training.launching import is_collective_timeout

    return is_collective_timeout(error)


def _end_process_group() -> None:
    """Leave torch.distributed's group, if this process joined one: a gloo process that exits with its group alive can
    abort in its threads at shutdown ("terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
