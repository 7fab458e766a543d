"""image-feature-extraction pipeline and openus_hub.extract_features with a tiny random OpenUS model."""

import numpy as np
import pydicom.examples
import pytest
import torch
from PIL import Image
from transformers import pipeline

from openus_hub import OpenUSForImageClassification, OpenUSImageProcessor, extract_features
from tests.conftest import TINY_OPENUS_SIZE

pytestmark = pytest.mark.filterwarnings("ignore::openus_hub.io.BurnedInAnnotationWarning")
SIZE = TINY_OPENUS_SIZE  # the processor saved with the tiny_openus fixture


@pytest.fixture(scope="module")
def still():
    return Image.fromarray(pydicom.examples.rgb_color.pixel_array)


def test_pipeline_by_path_and_by_object(tiny_openus, still):
    model, folder = tiny_openus
    proc = OpenUSImageProcessor(size=SIZE)
    with torch.no_grad():
        ref = model(**proc(still, return_tensors="pt"))
    by_path = pipeline("image-feature-extraction", model=str(folder))
    tokens = np.asarray(by_path(still))
    assert tokens.shape == (1, 1 + 2 * 2, 64)  # 64 px / 32 = 2x2 tokens plus the mean token
    assert np.allclose(tokens[0], ref.last_hidden_state[0].numpy(), atol=1e-5)
    pooled = np.asarray(by_path(still, pool=True))
    assert np.allclose(pooled[0], ref.pooler_output[0].numpy(), atol=1e-5)
    by_object = pipeline("image-feature-extraction", model=model, image_processor=proc)
    assert np.allclose(np.asarray(by_object(still, pool=True)), pooled, atol=1e-6)


def test_extract_features_images_and_cine(tiny_openus, still):
    model, folder = tiny_openus
    cine = pydicom.examples.get_path("ybr_color")
    gray16 = (np.asarray(still.convert("L")).astype(np.uint16) * 257)
    out = extract_features(model, [still, cine, gray16], OpenUSImageProcessor(size=SIZE), batch_size=3, num_frames=4)
    assert out.pooled.shape == (1 + 4 + 1, 64) and out.pooled.dtype == torch.float32
    assert [m.shape for m in out.stage_maps] == [(6, 8, 16, 16), (6, 16, 8, 8), (6, 32, 4, 4), (6, 64, 2, 2)]
    assert [it.frame_index for it in out.items] == [0, 0, 10, 19, 29, 0]
    assert out.items[1].source.endswith("examples_ybr_color.dcm") and out.items[1].crop_box is not None
    assert out.items[0].shape == (240, 320, 3)
    # batching does not change results, and the pooled vector is the mean of the last stage map
    single = extract_features(model, [still], OpenUSImageProcessor(size=SIZE), batch_size=1)
    assert torch.allclose(single.pooled[0], out.pooled[0], atol=1e-5)
    assert torch.allclose(out.pooled, out.stage_maps[3].mean(dim=(2, 3)), atol=1e-5)
    # a 16-bit copy (x257) of the 8-bit gray still gives nearly the same embedding: only the uint8 rounding after the
    # 8-bit resize differs (the 16-bit path resizes in float)
    gray8 = extract_features(model, [still.convert("L")], OpenUSImageProcessor(size=SIZE)).pooled[0]
    assert torch.allclose(out.pooled[-1], gray8, atol=2e-2)
    assert not torch.allclose(out.pooled[-1], gray8 * 0 + out.pooled[0], atol=2e-2)  # and differs from the RGB still


def test_extract_features_from_folder_and_head_model(tiny_openus, still):
    model, folder = tiny_openus
    by_folder = extract_features(str(folder), [still], return_stage_maps=False)  # uses the saved processor (64 px)
    assert by_folder.stage_maps is None and by_folder.pooled.shape == (1, 64)
    direct = extract_features(model, [still], OpenUSImageProcessor(size=SIZE)).pooled
    assert torch.allclose(by_folder.pooled, direct, atol=1e-6)
    head = OpenUSForImageClassification.from_pretrained(folder, num_labels=3).eval()
    via_head = extract_features(head, [still], OpenUSImageProcessor(size=SIZE)).pooled
    assert torch.allclose(via_head, direct, atol=1e-6)
