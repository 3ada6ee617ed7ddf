"""Optional Grad-CAM overlays (the ``grad-cam`` package, extra ``tracin[gradcam]``): for a test image
and its top proponents, where in each image the final model looks for the test image's predicted class."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image
from torch import nn

from ...checkpoints import Checkpoint, weights_for
from ..image.folders import image_transform
from ...errors import TracInError
from ..image.models import SmallCNN, build_model, normalization
from .figures import _save, plt
from .load import Results


def _target_layer(model: nn.Module) -> nn.Module:
    """The output of the last convolution block: layer4[-1] for ResNets, the last ReLU of the small
    CNN's features, else the last Conv2d."""
    if hasattr(model, "layer4"):
        return model.layer4[-1]
    if isinstance(model, SmallCNN):
        return [m for m in model.features if isinstance(m, nn.ReLU)][-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TracInError("Grad-CAM needs a convolutional model; this one has no Conv2d layer.")
    return convs[-1]


def gradcam_overlays(res: Results, n_tests: int = 3, n_proponents: int = 5) -> List[Path]:
    """Write ``gradcam/test_{index}.png`` for the first ``n_tests`` scored test images."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise TracInError("Grad-CAM overlays need the grad-cam package: pip install -e '.[gradcam]' in the tracin source folder.") from exc
    data = res.manifest["data"]
    arch, size, classes = data["arch"], int(data["image_size"]), res.class_names
    model = build_model(arch, len(classes), size)
    # the weights as influence read them: a wrapper's prefix (module., model.) stripped, shapes checked
    trusted = bool(res.manifest.get("parameters", {}).get("trust_checkpoint"))  # as the influence run read it
    model.load_state_dict(weights_for(model, Checkpoint(res.manifest["prediction_model"]["file"], learning_rate=0.0, trust=trusted)))
    model.eval()
    transform = image_transform(size, normalization(arch))
    written = []
    with GradCAM(model=model, target_layers=[_target_layer(model)]) as cam:
        for row, t in enumerate(res.test_indices.tolist()[:n_tests]):
            test = res.test[int(t)]
            target = classes.index(test["predicted"])
            files = [test["file"]] + [res.train[j]["file"] for j in res.pro_indices[row][:n_proponents].tolist()]
            captions = [f"test {test['label']}→{test['predicted']}"] + [
                f"#{k + 1} {res.train[j]['label']} {v:+.3g}" for k, (j, v) in
                enumerate(zip(res.pro_indices[row][:n_proponents].tolist(), res.pro_values[row][:n_proponents].tolist()))]
            fig, axes = plt.subplots(1, len(files), figsize=(2.2 * len(files), 2.6), squeeze=False)
            for ax, path, caption in zip(axes[0], files, captions):
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
                    x = transform(img).unsqueeze(0)
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
                ax.imshow(show_cam_on_image(rgb, heat, use_rgb=True))
                ax.set_title(caption, fontsize=8)
                ax.axis("off")
            fig.suptitle(f"Grad-CAM for class {test['predicted']}: test image and its top proponents", fontsize=10)
            written.append(_save(fig, res.directory / "gradcam" / f"test_{int(t)}.png"))
    return written
