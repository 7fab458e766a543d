"""OpenUS under transformers' own common tests, as a model added to transformers is tested.

The mixins (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) come from the transformers sdist of the
installed version (`scripts/fetch_peer_tests.py`, see `tests/models/peer_suites.py`). This file follows ConvNeXt's
test file (`tests/models/convnext/test_modeling_convnext.py` in transformers): the same tester layout, the same three
skips, and ConvNeXt's own `test_hidden_states_output` (a hierarchical model has channel-first stage maps, not token
sequences). The additions to ConvNeXt's file are marked "OpenUS:" and say why.

Without the peer files every test here skips on a user's machine and fails under OPENUS_HUB_STRICT_TESTS=1 (CI).
"""

import unittest

import torch

from openus_hub import (
    OpenUSBackbone,
    OpenUSConfig,
    OpenUSForImageClassification,
    OpenUSForSemanticSegmentation,
    OpenUSModel,
)
from tests.conftest import skip_or_fail
from tests.models import peer_suites

try:
    _common = peer_suites.transformers_module("test_modeling_common")
    _backbone = peer_suites.transformers_module("test_backbone_common")
    _configuration = peer_suites.transformers_module("test_configuration_common")
    ModelTesterMixin, floats_tensor, ids_tensor = _common.ModelTesterMixin, _common.floats_tensor, _common.ids_tensor
    BackboneTesterMixin, ConfigTester = _backbone.BackboneTesterMixin, _configuration.ConfigTester
    MISSING = None
except peer_suites.PeerSuiteMissing as err:
    MISSING = str(err)

    class _Missing:
        def setUp(self):
            skip_or_fail(MISSING)

    ModelTesterMixin = BackboneTesterMixin = _Missing
    ConfigTester = floats_tensor = ids_tensor = None

ALL_MODEL_CLASSES = (OpenUSModel, OpenUSForImageClassification, OpenUSBackbone, OpenUSForSemanticSegmentation)


class _ListedLikeAnInTreeModel:
    """OpenUS: the common tests pick labels and skip base models by looking model classes up in transformers'
    static name tables (`MODEL_FOR_..._MAPPING_NAMES` in `models/auto/modeling_auto.py`), which list in-tree models
    only. A third-party model is registered with the Auto classes instead (`openus_hub/models/__init__.py`). While
    these tests run, the registered OpenUS classes are entered in those tables under `openus`, as an in-tree model
    would be; the Auto lookups themselves read the registrations, so this changes nothing else."""

    _tables = {
        "MODEL_MAPPING_NAMES": OpenUSModel,
        "MODEL_FOR_BACKBONE_MAPPING_NAMES": OpenUSBackbone,
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": OpenUSForImageClassification,
        "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES": OpenUSForSemanticSegmentation,
    }

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from transformers.models.auto import modeling_auto

        cls._added = []
        for table, model_class in cls._tables.items():
            names = getattr(modeling_auto, table)
            if "openus" not in names:
                names["openus"] = model_class.__name__
                cls._added.append(names)

    @classmethod
    def tearDownClass(cls):
        for names in cls._added:
            names.pop("openus", None)
        super().tearDownClass()


class OpenUSModelTester:
    def __init__(
        self,
        parent,
        batch_size=2,
        image_size=32,
        num_channels=3,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        d_state=2,
        is_training=True,
        use_labels=True,
        hidden_act="gelu",
        num_labels=3,
        initializer_range=0.02,
        out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4],
        scope=None,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_stages = len(depths)
        self.hidden_sizes = [embed_dim * 2**i for i in range(self.num_stages)]
        self.d_state = d_state
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_act = hidden_act
        self.num_labels = num_labels
        self.initializer_range = initializer_range
        self.out_features = out_features
        self.out_indices = out_indices
        self.scope = scope

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def get_config(self):
        return OpenUSConfig(
            num_channels=self.num_channels,
            embed_dim=self.embed_dim,
            depths=self.depths,
            d_state=self.d_state,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            out_features=self.out_features,
            out_indices=self.out_indices,
            num_labels=self.num_labels,
            drop_path_rate=0.0,
            # OpenUS: the segmentation head's decoder, small: one block at the finest level, the other levels upsample
            decoder_depths=[1, 0, 0, 0],
            decoder_d_state=2,
        )

    def create_and_check_model(self, config, pixel_values, labels):
        model = OpenUSModel(config=config).eval()
        result = model(pixel_values)
        # OpenUS: last_hidden_state is upstream's token sequence, [mean token; H/32 x W/32 tokens] of width C_last
        self.parent.assertEqual(
            result.last_hidden_state.shape,
            (self.batch_size, 1 + (self.image_size // 32) ** 2, self.hidden_sizes[-1]),
        )
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_sizes[-1]))

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = OpenUSForImageClassification(config).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def create_and_check_for_semantic_segmentation(self, config, pixel_values, labels):
        model = OpenUSForSemanticSegmentation(config).eval()
        pixel_labels = ids_tensor([self.batch_size, self.image_size, self.image_size], self.num_labels)
        result = model(pixel_values, labels=pixel_labels)
        expected = (self.batch_size, self.num_labels, self.image_size, self.image_size)
        self.parent.assertEqual(result.logits.shape, expected)
        self.parent.assertTrue(torch.isfinite(result.loss))

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = OpenUSBackbone(config=config).eval()
        result = model(pixel_values)

        # verify feature maps
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, self.hidden_sizes[1], 4, 4])

        # verify channels
        self.parent.assertEqual(len(model.channels), len(config.out_features))
        self.parent.assertListEqual(model.channels, config.hidden_sizes[1:])

        # verify backbone works with out_features=None
        config.out_features = None
        model = OpenUSBackbone(config=config).eval()
        result = model(pixel_values)

        # verify feature maps
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, self.hidden_sizes[-1], 1, 1])

        # verify channels
        self.parent.assertEqual(len(model.channels), 1)
        self.parent.assertListEqual(model.channels, [config.hidden_sizes[-1]])

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, labels = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class OpenUSModelTest(_ListedLikeAnInTreeModel, ModelTesterMixin, unittest.TestCase):
    """
    Here we also overwrite some of the tests of test_modeling_common.py, as OpenUS does not use input_ids,
    inputs_embeds, attention_mask and seq_length.
    """

    all_model_classes = ALL_MODEL_CLASSES

    test_resize_embeddings = False
    # OpenUS: `output_attentions` returns one implicit attention map (the last block's SS2D scans, a read-out under
    # no_grad), not per-layer softmax attentions on the output's gradient path, which the generic attention tests
    # assume; its contract and upstream parity are tested in tests/test_modeling_openus.py and
    # tests/test_convert_openus.py. ConvNeXt sets this to False as well.
    has_attentions = False
    test_torch_exportable = True

    def setUp(self):
        super().setUp()
        self.model_tester = OpenUSModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=OpenUSConfig,
            has_text_modality=False,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            common_properties=["num_channels", "hidden_sizes"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="not applicable: OpenUS does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="not applicable: OpenUS does not support input and output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="not applicable: OpenUS does not use feedforward chunking")
    def test_feed_forward_chunking(self):
        pass

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

    def test_backbone(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_backbone(*config_and_inputs)

    def test_hidden_states_output(self):
        def check_hidden_states_output(inputs_dict, config, model_class):
            model = model_class(config)
            model.eval()

            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class))

            hidden_states = outputs.encoder_hidden_states if config.is_encoder_decoder else outputs.hidden_states

            expected_num_stages = self.model_tester.num_stages
            self.assertEqual(len(hidden_states), expected_num_stages + 1)

            # OpenUS's feature maps are of shape (batch_size, num_channels, height, width)
            self.assertListEqual(
                list(hidden_states[0].shape[-2:]),
                [self.model_tester.image_size // 4, self.model_tester.image_size // 4],
            )

        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()

        for model_class in self.all_model_classes:
            inputs_dict["output_hidden_states"] = True
            check_hidden_states_output(inputs_dict, config, model_class)

            # check that output_hidden_states also work using config
            del inputs_dict["output_hidden_states"]
            config.output_hidden_states = True

            check_hidden_states_output(inputs_dict, config, model_class)

    def test_for_image_classification(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_for_image_classification(*config_and_inputs)

    def test_for_semantic_segmentation(self):
        # OpenUS: the segmentation head (upstream's MambaDecoder), checked as the image-classification head is
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_for_semantic_segmentation(*config_and_inputs)


class OpenUSBackboneTest(_ListedLikeAnInTreeModel, unittest.TestCase, BackboneTesterMixin):
    all_model_classes = (OpenUSBackbone,)
    config_class = OpenUSConfig

    has_attentions = False

    def setUp(self):
        super().setUp()
        self.model_tester = OpenUSModelTester(self)
