"""Our models against transformers' own shared model tests (`ModelTesterMixin`, `ConfigTester`), bottleneck off and on.

The mixins come from the source distribution of the installed transformers (see upstream_tests.py: pip downloads it
from the package registry; without a registry this module skips). The testers are ours, built on the pattern of
upstream's SigLIP testers: tiny configs, small batches. Every test the mixin holds runs unless skipped below with
its reason (or by upstream's own conditions: accelerators, flash attention, DeepSpeed, slow tests, features such as
MoE that these models lack). `torch.export` / `torch.compile` and resizing the bottleneck table in a way a user would
are tested in test_model_export.py and test_added_tokens_training.py, which need no download.
"""

import unittest

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, SiglipConfig, SiglipVisionConfig

import upstream_tests
from hf_siglip import (
    SiglipBottleneckConfig,
    SiglipBottleneckModel,
    SiglipBottleneckTextConfig,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)
from hf_siglip.dual_encoders import CLIPDualEncoder, SiglipDualEncoder

try:
    UPSTREAM = upstream_tests.load()
except upstream_tests.UpstreamTestsUnavailable as error:  # no registry: nothing here can run
    pytest.skip(f"transformers' shared model tests are unavailable: {error}", allow_module_level=True)

ModelTesterMixin = UPSTREAM.modeling.ModelTesterMixin
ConfigTester = UPSTREAM.configuration.ConfigTester
ids_tensor = UPSTREAM.modeling.ids_tensor
floats_tensor = UPSTREAM.modeling.floats_tensor

BATCH, SEQ, VOCAB, WIDTH, LAYERS, HEADS = 3, 7, 99, 32, 1, 4
IMAGE, PATCH = 16, 8
BOTTLENECK = 8


def text_config_kwargs(bottleneck_dim=None) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=37, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                pad_token_id=1, bottleneck_dim=bottleneck_dim)


def vision_config_kwargs() -> dict:
    return dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=37)


def text_inputs():
    input_ids = ids_tensor([BATCH, SEQ], VOCAB)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, start in enumerate(torch.randint(1, SEQ - 1, (BATCH,)).tolist()):
        mask[row, start:] = 0  # right padding, as the collator pads
    return input_ids, mask


class _Tester:
    """What the mixin reads from `self.model_tester`."""

    batch_size = BATCH
    hidden_size = WIDTH
    num_hidden_layers = LAYERS
    num_attention_heads = HEADS
    vocab_size = VOCAB
    is_training = True

    def __init__(self, parent, bottleneck_dim=None):
        self.parent = parent
        self.bottleneck_dim = bottleneck_dim


class TextTester(_Tester):
    seq_length = SEQ

    def get_config(self):
        return SiglipBottleneckTextConfig(**text_config_kwargs(self.bottleneck_dim))

    def prepare_config_and_inputs_for_common(self):
        input_ids, mask = text_inputs()
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask}


class VisionTester(_Tester):
    seq_length = (IMAGE // PATCH) ** 2
    image_size = IMAGE
    patch_size = PATCH

    def get_config(self):
        return SiglipVisionConfig(**vision_config_kwargs())

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": floats_tensor([BATCH, 3, IMAGE, IMAGE])}


class DualTester(_Tester):
    seq_length = SEQ

    def __init__(self, parent, bottleneck_dim=None):
        super().__init__(parent, bottleneck_dim)
        self.text_model_tester = TextTester(parent, bottleneck_dim)
        self.vision_model_tester = VisionTester(parent)

    def get_config(self):
        return SiglipBottleneckConfig(text_config=text_config_kwargs(self.bottleneck_dim),
                                      vision_config=vision_config_kwargs())

    def prepare_config_and_inputs_for_common(self):
        input_ids, mask = text_inputs()
        pixel_values = floats_tensor([BATCH, 3, IMAGE, IMAGE])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values,
                                   "return_loss": False}


class SiglipAdapterTester(DualTester):
    def get_config(self):
        text = {key: value for key, value in text_config_kwargs().items() if key != "bottleneck_dim"}
        return SiglipConfig(text_config=text, vision_config=vision_config_kwargs())


class CLIPAdapterTester(DualTester):
    def get_config(self):
        text = {key: value for key, value in text_config_kwargs().items() if key != "bottleneck_dim"}
        vision = {key: value for key, value in vision_config_kwargs().items()}
        return CLIPConfig(text_config={**text, "bos_token_id": 0, "eos_token_id": 2}, vision_config=vision,
                          projection_dim=16)


# the test classes name their tester by key: a class attribute holding a class breaks pytest's traceback filter
TESTERS = {"dual": DualTester, "siglip_adapter": SiglipAdapterTester, "clip_adapter": CLIPAdapterTester}

# --- the test classes --------------------------------------------------------------------------------------------

TOWER_HAS_NO_LOSS = ("a tower alone has no loss to train on "
                     "(upstream skips SiglipTextModel/SiglipVisionModel the same way)")
FLAX_INIT = "SigLIP initialises as the Flax original does, not with initializer_range (upstream skips it the same way)"


class _Common(ModelTesterMixin):
    """Skips that hold for every class here, each with its reason."""

    # accelerate's offloading splits SigLIP's MultiheadAttention pooling head from its probe (upstream: the same)
    test_cpu_offload = False
    test_disk_offload_safetensors = False
    test_disk_offload_bin = False
    # upstream runs test_can_init_all_missing_weights only for models whose config file carries a copyright year
    # from 2023 on; ours carries none, so without this it would skip as "not a prioritized model"
    test_can_init_all_missing_weights_before_2023 = True

    @unittest.skip(reason=FLAX_INIT)
    def test_initialization(self):
        pass

    @unittest.skip(reason="SigLIP's towers take token ids or pixels, not inputs_embeds (upstream skips it too)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="SigLIP's towers take token ids or pixels, not inputs_embeds (upstream skips it too)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="SigLIP's position tables have no resize_position_embeddings (transformers' SigLIP classes "
                          "have none either)")
    def test_resize_position_vector_embeddings(self):
        pass

    @unittest.skip(reason="a tower is not a composite model: test_sdpa_can_dispatch_non_composite_models covers it")
    def test_sdpa_can_dispatch_composite_models(self):
        pass


class _TextTowerTests(_Common):
    all_model_classes = (SiglipBottleneckTextModel,)
    bottleneck_dim = None

    def setUp(self):
        self.model_tester = TextTester(self, self.bottleneck_dim)
        self.config_tester = ConfigTester(self, config_class=SiglipBottleneckTextConfig, hidden_size=37,
                                          bos_token_id=None, eos_token_id=None, bottleneck_dim=self.bottleneck_dim)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass


class TextTowerTest(_TextTowerTests, unittest.TestCase):
    bottleneck_dim = None


class TextTowerBottleneckTest(_TextTowerTests, unittest.TestCase):
    bottleneck_dim = BOTTLENECK


class VisionTowerTest(_Common, unittest.TestCase):
    all_model_classes = (SiglipBottleneckVisionModel,)
    test_resize_embeddings = False  # no token table

    def setUp(self):
        self.model_tester = VisionTester(self)
        self.config_tester = ConfigTester(self, config_class=SiglipVisionConfig, has_text_modality=False,
                                          hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        """A vision tower's input embedding is its patch embedding, not a token table (upstream's SigLIP vision test
        replaces this test the same way)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = SiglipBottleneckVisionModel(config)
        self.assertIs(model.get_input_embeddings(), model.vision_model.embeddings.patch_embedding)
        self.assertIsInstance(model.get_input_embeddings(), nn.Conv2d)
        self.assertIsNone(model.get_output_embeddings())

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason=TOWER_HAS_NO_LOSS)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass


class _DualTests(_Common):
    all_model_classes = (SiglipBottleneckModel,)
    additional_model_inputs = ["pixel_values"]
    _is_composite = True
    bottleneck_dim = None
    tester = "dual"
    config_class = SiglipBottleneckConfig

    def setUp(self):
        self.model_tester = TESTERS[self.tester](self, self.bottleneck_dim)
        self.config_tester = ConfigTester(self, config_class=self.config_class, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:  # a dual encoder's labels are the pairing of the batch: the loss needs return_loss only
            inputs["return_loss"] = True
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="hidden states are tested in the tower tests (upstream skips it for SiglipModel too)")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="tested in the tower tests (upstream skips it for SiglipModel too)")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="a dual encoder is a composite model: test_sdpa_can_dispatch_composite_models covers it")
    def test_sdpa_can_dispatch_non_composite_models(self):
        pass

    def test_sdpa_can_dispatch_composite_models(self):
        ModelTesterMixin.test_sdpa_can_dispatch_composite_models(self)

    @unittest.skip(reason="a dual encoder's output holds each tower's output (text_model_output, vision_model_output), "
                          "not one `attentions`; attentions are tested in the tower tests "
                          "(as upstream for SiglipModel)")
    def test_attention_outputs(self):
        pass


EAGER_VS_SDPA_IN_TOWERS = (
    "attention runs only inside the towers, whose classes here compare eager with sdpa in every setting; the dual "
    "encoder's choice of implementation per tower is tested by test_sdpa_can_dispatch_composite_models and "
    "test_attn_implementation_composite_models")
for _name in [name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_sdpa_inference")]:
    setattr(_DualTests, _name, unittest.skip(reason=EAGER_VS_SDPA_IN_TOWERS)(lambda self: None))


class DualEncoderTest(_DualTests, unittest.TestCase):
    bottleneck_dim = None


class DualEncoderBottleneckTest(_DualTests, unittest.TestCase):
    bottleneck_dim = BOTTLENECK


class SiglipAdapterTest(_DualTests, unittest.TestCase):
    all_model_classes = (SiglipDualEncoder,)
    tester = "siglip_adapter"
    config_class = SiglipConfig


class CLIPAdapterTest(_DualTests, unittest.TestCase):
    all_model_classes = (CLIPDualEncoder,)
    tester = "clip_adapter"
    config_class = CLIPConfig

    @unittest.skip(reason="transformers.CLIPModel has no get_input_embeddings (upstream skips this for CLIPModel); "
                          "the adapter keeps the native class's API")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="transformers.CLIPModel has no get_input_embeddings: there is no embedding whose gradient "
                          "the test could follow")
    def test_enable_input_require_grads_with_gradient_checkpointing(self):
        pass

    @unittest.skip(reason="transformers.CLIPModel has no get_input_embeddings, so resize_token_embeddings finds no "
                          "table to resize (the native class's API, which the adapter keeps)")
    def test_resize_tokens_embeddings(self):
        pass
