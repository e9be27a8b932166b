"""qdrop_mm: QDrop post-training quantization for OpenMMLab detectors and segmentors."""
from setuptools import find_packages, setup

setup(
    name='qdrop_mm',
    version='0.1.0',
    description='Post-training quantization (QDrop, BRECQ, AdaRound) for mmdet and mmseg models',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['qdrop_mm', 'qdrop_mm.*']),
    package_data={'qdrop_mm.demo': ['checkpoints/*/fp_model.pth', 'checkpoints/*/fp_metrics.json']},
    # The core needs torch only; the OpenMMLab layer needs the rest. Exact, tested
    # versions are in requirements/lock.txt and installed by tools/setup_env.sh.
    install_requires=['torch>=2.0', 'numpy<2'],
    entry_points={'console_scripts': ['qdrop-ptq=qdrop_mm.cli.ptq:console',
                                      'qdrop-sensitivity=qdrop_mm.cli.sensitivity:console',
                                      'qdrop-export-onnx=qdrop_mm.cli.export_onnx:console']},
    extras_require={
        'mm': ['mmengine==0.10.7', 'mmcv>=2.0.0,<2.2.0', 'mmdet==3.3.0', 'mmsegmentation==1.2.2',
               'pycocotools'],
        'test': ['pytest'],
    },
)
