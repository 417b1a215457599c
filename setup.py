from setuptools import find_packages, setup

setup(
    name="diffusers-var",
    version="0.1.0",
    description="VAR (Visual AutoRegressive modeling, next-scale prediction) as diffusers/transformers components",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # src/diffusers_var/model_cards links to the top-level model_cards/, so the templates ship in the wheel;
    # pretrained/<name>/ holds the bundled pipelines (diffusers_var.pretrained), folders that are not packages
    package_data={
        "diffusers_var": [
            "data/*.json",
            "model_cards/*.md",
            "pretrained/**/*.safetensors",
            "pretrained/**/*.json",
            "pretrained/**/*.md",
        ]
    },
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0,<6",
        "accelerate>=1.15",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "torchmetrics>=1.4",  # FID, Inception Score and KID of `diffusers-var evaluate`
    ],
    extras_require={
        # peft: LoRA through transformers' integration (transformers 5.23 needs peft >= 0.20, 5.24 needs >= 0.22)
        "train": ["datasets>=3", "tensorboard", "peft>=0.20", "faiss-cpu>=1.8"],
        "test": [
            "pytest>=8", "ruff", "datasets>=3", "tensorboard", "scikit-learn>=1.3", "peft>=0.20", "faiss-cpu>=1.8"
        ],
        # diffusers-var index and the retrieval datastore: the images as a datasets dataset, an exact FAISS index
        "retrieval": ["datasets>=3", "faiss-cpu>=1.8"],
        # examples/digits: the data (sklearn's bundled digits) and the evaluation's classifier and feature MLP
        "digits": ["scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["diffusers-var=diffusers_var.cli:main"]},
)
