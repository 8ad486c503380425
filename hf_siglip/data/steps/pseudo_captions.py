"""Step ``pseudo_captions``: FFF's batch text augmentation source (section 3.2) and BLIP's captioner (CapFilt);
captions sampled from a transformers image-to-text model, or from a captioner trained by this package (``model:`` a
training output folder with ``captioner/``, or that folder: BLIP's bootstrapping, the ``blip_bootstrap`` recipe),
into a ``pseudo_captions`` column (see :mod:`hf_siglip.data.pseudo_captions`). Nucleus sampling (``top_p: 0.9``
unless ``generate_kwargs`` says otherwise), seeded from the run's seed and the row index: a rerun writes the same
captions, and on N processes the main process captions once for all."""

from dataclasses import dataclass

from ..pseudo_captions import add_pseudo_captions, load_captioner
from . import register_data_step


@dataclass
class PseudoCaptionsConfig:
    model: str = ""  # an image-to-text checkpoint (BLIP, BLIP-2, GIT, ...) or an hf-siglip output with captioner/
    num_captions: int = 3
    batch_size: int = 16
    prompt: str | None = None  # BLIP-2 / conditional captioning; a captioner trained here takes none
    generate_kwargs: dict | None = None
    output_dir: str | None = None  # resumable, sharded captioning of large datasets
    num_shards: int = 16

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required: an image-to-text checkpoint path or Hub id")
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")


@register_data_step("pseudo_captions", PseudoCaptionsConfig, reads_images=True)
def apply(dataset, config: PseudoCaptionsConfig, context):
    def compute(data):
        captioner, processor = load_captioner(config.model)
        data, counts = add_pseudo_captions(data, captioner, processor, num_captions=config.num_captions,
                                           batch_size=config.batch_size, seed=context.seed, prompt=config.prompt,
                                           generate_kwargs=config.generate_kwargs, output_dir=config.output_dir,
                                           num_shards=config.num_shards)
        context.record("pseudo_captions", counts)
        return data

    # the captioner runs (and output_dir's shards are written) on the main process only
    return context.computed_once("pseudo_captions", dataset, compute, ["pseudo_captions"])
