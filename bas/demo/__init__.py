"""``bas demo`` (:mod:`.demo`) and ``bas tiny-model`` (:mod:`.tiny`, tiny random pipelines the model
families build, which tests and the demo use)."""
