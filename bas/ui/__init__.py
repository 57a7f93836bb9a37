"""``bas ui``: a local web page to make masks by clicking, extract, generate and export (gradio, extra ``bas[ui]``).

:mod:`bas.ui.command` is the command (it imports gradio only when started); :mod:`bas.ui.workspace`,
:mod:`bas.ui.scenes`, :mod:`bas.ui.jobs` and :mod:`bas.ui.commands` hold what the page does (:mod:`bas.ui.access`, who may drive it), over
bas's Python API and plugins, and need no gradio; :mod:`bas.ui.app` is the page itself.
"""
