"""Packaging for distill: every dependency and extra is declared here and nowhere else."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

INSTALL_REQUIRES = [
    # 2.13 and older CPU wheels cannot load torchvision's compiled ops, which timm imports.
    "torch>=2.14",
    "torchvision",
    "timm>=1.0",
    "submitit>=1.5",
    "fvcore",
    "faiss-cpu",
    "scipy",
    "omegaconf>=2.3",
    "numpy",
    "pillow",
    "pyyaml",
    "safetensors",
    "tqdm",
    "matplotlib",
]

EXTRAS_REQUIRE = {
    # Memory-efficient attention kernels and faiss on CUDA. faiss-gpu provides the same `faiss`
    # module as faiss-cpu: uninstall faiss-cpu after installing this extra.
    "gpu": ["xformers", "faiss-gpu"],
    # scikit-learn: only the k-means comparison of tools/curation_scale.py.
    # import-linter: the layering contracts of .importlinter, checked by tests/test_layering.py.
    # diffusers, transformers: the sd extra, whose Stable Diffusion features the tests exercise on a tiny model.
    # onnx, onnxruntime, onnxscript: the export extra, whose ONNX graphs the tests check against PyTorch.
    # pytest below 9.2: pytest 9.2 builds a test's id from a field pytest-xdist 3.8 does not change, so xdist's
    # groups (--dist loadgroup, which keeps the SLURM tests on one worker) stop working (tests/test_suite_workers.py).
    "dev": ["pytest>=8,<9.2", "pytest-xdist", "pytest-timeout", "scikit-learn", "import-linter>=2.17", "diffusers>=0.30",
            "transformers", "onnx", "onnxruntime", "onnxscript"],
    # distill export --to onnx: the exporter (torch.onnx's dynamo path needs onnxscript) and the check of the graph
    # against PyTorch. --to hf needs transformers only to be loaded afterwards (the hf extra).
    "export": ["onnx", "onnxruntime", "onnxscript"],
    "hf": ["transformers"],
    # distill correspond --with sd:...: Stable Diffusion UNet features (transformers only for the empty-prompt
    # embedding, when the weights folder has a text encoder).
    "sd": ["diffusers>=0.30", "transformers"],
    # make bench: the peer library compared against, and the sample photos of the data and embedding figures.
    "bench": ["lightly", "scikit-image"],
}

setup(
    name="distill",
    version="0.1.0",
    description="Teach Vision Transformers from other networks or from themselves: DINO, DeiT, DINOv2 and data curation",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distill", "distill.*", "data_curation", "data_curation.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["distill=distill.cli:main", "distill-curate=data_curation.cli:main"]},
    license="Apache-2.0",
)
