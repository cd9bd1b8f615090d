"""Train an image classifier on workspace/images/<category>/ and save everything in a run folder.

python scripts/machine_learning.py --categories cat,dog,horse
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from image_classifier import cli
from image_classifier.distribute import STRATEGIES
from image_classifier.models import DEFAULT_MODEL, REGISTRY
from image_classifier.train import LR_SCHEDULES, OPTIMIZERS, TrainConfig, resume, train


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(__doc__.strip().splitlines()[0])
    data = parser.add_argument_group("data")
    cli.add_data_arguments(
        data,
        image_size_help="side in pixels (default: the model's own, 224 for mobilenet_v2, 64 for mlp, 150 for cnn)",
        categories_required=False,
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=list(REGISTRY),
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"mlp, cnn, or a pretrained backbone: {', '.join(list(REGISTRY)[2:])}",
    )
    model.add_argument(
        "--weights",
        help="imagenet (downloads once into KERAS_HOME), none, or a PATH to a Keras "
        ".h5 weights file (default: imagenet for backbones, none for mlp and cnn)",
    )
    model.add_argument(
        "--dense-units",
        type=cli.int_list_arg,
        metavar="N,N",
        help="hidden dense layers of the head, like 1024,512; '' for none "
        "(default: none for backbones, 512,256 for mlp, 512 for cnn)",
    )
    model.add_argument(
        "--dropout",
        type=cli.probability_arg,
        help="dropout rate in the head (default: 0.2 for backbones, 0.3 for mlp, 0.5 for cnn)",
    )
    model.add_argument("--l2", type=float, default=0.0, help="L2 weight penalty on the dense and conv layers")

    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=cli.positive_int,
        help="most epochs of the first phase (default: 20 "
        "for backbones, 30 for mlp and cnn); early stopping may end sooner",
    )
    training.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=32,
        help="images per training step (per replica with --distribute)",
    )
    training.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="sgd uses momentum 0.9")
    training.add_argument("--learning-rate", type=cli.positive_float, help="(default: 0.001)")
    training.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="cosine lowers the learning rate smoothly to 0 by the last epoch of each phase; constant keeps it "
        "(default: cosine for mlp and cnn, constant for backbones)",
    )
    training.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        help="BatchNormalization after each convolution of cnn: faster, steadier learning from scratch "
        "(default: on for cnn; --no-batch-norm gives the book's network)",
    )
    training.add_argument(
        "--augment",
        action="store_true",
        help="random flip, rotation, zoom and contrast while training (slower: backbone "
        "features can no longer be computed once)",
    )
    training.add_argument(
        "--fine-tune-layers",
        type=cli.non_negative_int,
        metavar="N",
        help="phase 2: unfreeze the top N backbone layers (default: 30)",
    )
    training.add_argument(
        "--fine-tune-epochs",
        type=cli.non_negative_int,
        metavar="N",
        help="phase 2 epochs; 0 skips fine-tuning (default: 0)",
    )
    training.add_argument(
        "--fine-tune-learning-rate", type=cli.positive_float, help="(default: a tenth of --learning-rate)"
    )
    training.add_argument(
        "--early-stopping",
        type=cli.non_negative_int,
        default=5,
        metavar="PATIENCE",
        help="stop after this many epochs without a better validation loss, keeping the best "
        "weights; 0 turns it off",
    )
    training.add_argument(
        "--class-weight",
        choices=("none", "auto"),
        default="none",
        help="auto weighs rare categories up (for unbalanced folders)",
    )
    training.add_argument("--seed", type=int, default=0, help="for the split, shuffling and initial weights")
    training.add_argument(
        "--distribute",
        choices=STRATEGIES,
        default="none",
        help="tf.distribute strategy: mirrored uses every GPU of this machine; multi-worker runs the same "
        "command on every machine of $TF_CONFIG (each reads its share of the data; the chief writes the run); "
        "the batch size is per replica and the learning rate is multiplied by the number of replicas",
    )
    training.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its last finished epoch: latest (the newest unfinished run), "
        "a folder name in runs/, or a path; it keeps the run's own options",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    workspace = cli.workspace_of(args)
    if args.resume:
        given = cli.given_options(parser, argv)
        for name in ("resume", "workspace"):
            given.pop(name, None)
        resume(workspace, args.resume, given)
        return
    if not args.categories:
        parser.error("the following arguments are required: --categories (or --resume RUN)")
    config = TrainConfig(
        categories=tuple(args.categories),
        images_dir=args.images_dir or workspace.images,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        batch_norm=args.batch_norm,
        dropout=args.dropout,
        dense_units=None if args.dense_units is None else tuple(args.dense_units),
        l2=args.l2,
        augment=args.augment,
        fine_tune_layers=args.fine_tune_layers,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        early_stopping=args.early_stopping,
        class_weight=args.class_weight,
        seed=args.seed,
        weights=args.weights,
        resize=args.resize,
        split=args.split,
        dedupe=args.dedupe,
        distribute=args.distribute,
        workers=args.workers,
    )
    train(config, workspace)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
