"""The one base of embcache's user errors: what a command reports as one line, without a traceback.

Each stage raises its own subclass, defined beside the code that raises it:

    DatasetError      embcache.datasets     malformed metadata
    EncoderError      embcache.encoders     an encoder spec or checkpoint that cannot be loaded
    TuneError         embcache.tune         a tuning run that cannot start
    ExtractError      embcache.extract      an extraction that cannot start
    StoreError        embcache.store        a store that cannot be used as asked
      IncompleteStoreError                  ... because the extraction that wrote it did not finish
    InterchangeError  embcache.interchange  an input that cannot be imported or exported
    FitError          embcache.config       fit / eval settings or inputs that cannot be used
      PromptError     embcache.hidden       an encoder or cache the prompt predictor cannot use
    BundleError       embcache.bundle       a run that cannot be exported, a bundle that cannot be applied
    PaperError        embcache.bench.paper  a paper-grid request (roots, encoders) that cannot run

The command line (`embcache.cli.common.user_errors`) catches `EmbcacheError` and nothing else, so any other
exception is a bug and keeps its traceback. The base stays a `ValueError`, as every stage error was before.
"""


class EmbcacheError(ValueError):
    """An input, setting or file that embcache cannot use as asked; the message names the problem."""
