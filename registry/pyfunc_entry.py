"""The pyfunc model MLflow logs as code ("models from code"), not as a pickle.

`mlflow.pyfunc.log_model(python_model=<this file>)` copies this file into the logged
model; `mlflow.pyfunc.load_model` runs it, and it names the class from the installed
squeezeflow. Nothing is unpickled, so a registry entry cannot smuggle in code that a
reviewer cannot read: what runs is this file and the installed package.
"""

from mlflow.models import set_model

from squeezeflow.registry.pyfunc import CompressedModel

set_model(CompressedModel())
