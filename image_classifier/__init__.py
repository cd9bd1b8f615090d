"""Train image classifiers on your own categories: gather, preprocess, train, look, use.

Importing the package is cheap: TensorFlow is imported only by the modules that train or run models.
"""

__version__ = "0.1.0"
