"""`import art` for this repo: ART 0.5.18 imported so that it leaves transformers working.

art/__init__.py patches transformers at import time for the transformers ART pins (5.2.0); under
the CPU stack's transformers 5.17 that patch breaks every model forward in the process. Every
module that needs ART (the ART loop, its configuration, the CPU engine, the GPU check) imports it
through `import_art()`; in .venv-art (ART's own pins) the patch stays.

    python -c "from hntitles.art import compat; print(compat.import_art().__version__)"
"""

from __future__ import annotations

import os


def import_art():
    """`import art`, undoing its transformers patch where the patch does not fit.

    art/__init__.py replaces transformers.masking_utils._preprocess_mask_arguments with a
    wrapper written for the transformers ART pins (5.2.0: seven arguments, cache_position
    among them). Under the CPU stack's transformers 5.17 (no cache_position) that wrapper
    breaks every later model forward in the process, so there the original is put back; in
    .venv-art it stays.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # ART imports litellm: no network for its price map
    import art

    try:
        import inspect

        from art.transformers import patches
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing was patched
        return art
    original = patches._preprocess_mask_arguments
    if (masking_utils._preprocess_mask_arguments is patches._patched_preprocess_mask_arguments
            and "cache_position" not in inspect.signature(original).parameters):
        masking_utils._preprocess_mask_arguments = original
    return art
