"""Which log lines a person watching a run sees: our own progress (the `moce_model` loggers at INFO) and every
library's warnings, not the libraries' INFO chatter or progress bars (`MOCE_VERBOSE=1` brings those back).

At INFO, transformers prints a model's whole config each time it loads one (118 times in a demo run, most of its
3,900 lines), and its weight-loading bars add more.
"""

from __future__ import annotations

import logging
import os

from transformers.utils import logging as hf_logging

OWN_LOGGER = "moce_model"
# Library loggers whose INFO lines are noise for us; their warnings are kept.
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "sentence_transformers", "lm_eval", "lm-eval",
                   "bitsandbytes", "datasets", "huggingface_hub")
VERBOSE_ENV = "MOCE_VERBOSE"

# bitsandbytes (0.50) logs this warning whenever it is imported on a CPU with AVX512-BF16 and the optional `kernels`
# package is absent: `kernels` downloads a faster NF4 matrix product from the Hugging Face Hub, which an offline
# project does not install. bitsandbytes then computes the same product with its own CPU kernel, so the line asks
# nothing of the reader, and it comes again in every process that loads a model. The message is a logging record,
# not a `warnings.warn` (which a warnings filter would catch), so a logging filter on the one logger that emits it
# drops that one message and lets every other bitsandbytes warning through. bitsandbytes logs it while it is imported
# (peft imports it), so the filter is installed when `moce_model` is imported (`drop_bitsandbytes_kernels_notice`).
BITSANDBYTES_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class DropMessage(logging.Filter):
    """Drops the records whose message (its format string) starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def drop_bitsandbytes_kernels_notice() -> None:
    """Install the filter of the bitsandbytes `kernels` notice (once)."""
    kernels_logger = logging.getLogger(BITSANDBYTES_KERNELS_LOGGER)
    if not any(isinstance(f, DropMessage) and f.prefix == BITSANDBYTES_KERNELS_MESSAGE for f in kernels_logger.filters):
        kernels_logger.addFilter(DropMessage(BITSANDBYTES_KERNELS_MESSAGE))


def quiet_library_logs(verbose: bool | None = None) -> None:
    """Our loggers at INFO; the libraries' at WARNING and their progress bars off, unless `verbose` (default:
    $MOCE_VERBOSE); the bitsandbytes `kernels` notice dropped. Call it before the libraries load models; calling
    it again changes nothing."""
    # datasets takes a second to import; only the processes that run models and quiet their logs need it.
    from datasets.utils import disable_progress_bars as disable_datasets_progress_bars
    from datasets.utils import enable_progress_bars as enable_datasets_progress_bars

    verbose = is_verbose() if verbose is None else verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger(OWN_LOGGER).setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    hf_logging.set_verbosity(level)
    if verbose:
        hf_logging.enable_progress_bar()
        enable_datasets_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        disable_datasets_progress_bars()
    drop_bitsandbytes_kernels_notice()
