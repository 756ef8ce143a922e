"""The one compiled part: the MQTT fast paths' walk (proxy/mqtt/_walk.c, see proxy/mqtt/fastpath.py).

optional: where no C compiler or Python headers are found the install goes on, and fastpath.py
uses its Python walk (the same answers, tested against each other).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.mqtt._walk", ["proxy/mqtt/_walk.c"], optional=True,
                             extra_compile_args=["-O2"])])
