"""qwen-chat: an OpenAI- and Ollama-compatible service for Qwen2.5-1.5B-Instruct on the LLM-8850 card."""
import atexit
import logging
import os


def create_app(test_config=None):
    """The application factory (as in Flask's tutorial).

    `test_config` entries go to app.config, except two read here: SETTINGS, a configuration mapping used
    instead of the YAML file, and INSTANCE_PATH, the instance folder (lock file, runner working directory;
    QWEN_CHAT_INSTANCE in the environment sets it too, e.g. for a second service on another card).
    """
    # Imported here, not above: the runner's own processes (the emulator, the tokenizer service) import app.runner
    # only, and need none of Flask.
    from flask import Flask

    from app import config

    test_config = dict(test_config or {})
    instance_path = test_config.pop("INSTANCE_PATH", None) or os.environ.get(config.ENV_INSTANCE) or None
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    settings = config.load(test_config.pop("SETTINGS", None))
    app.config.from_mapping(QWEN=settings, MAX_CONTENT_LENGTH=settings["server"]["max_body_bytes"])
    app.config.update(test_config)
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    os.makedirs(app.instance_path, exist_ok=True)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app.backend import Backend
    from app.errors import register_error_handlers
    from app import auth, cors, health, metrics, ollama_api, openai_api, page, requestlog, tokenize_api

    backend = Backend(settings, app.instance_path).start()
    app.extensions["qwen"] = backend
    atexit.register(backend.stop)

    register_error_handlers(app)
    # before_request hooks run in the order they are registered here (after_request ones in reverse).
    requestlog.init_app(app)        # first: every request gets an id and a log record, errors included
    cors.init_app(app)              # then CORS: a preflight carries no key
    auth.init_app(app)              # then the API key
    metrics.init_app(app, backend)  # counts what requestlog records (it adds itself as an observer)
    app.register_blueprint(health.bp)
    app.register_blueprint(openai_api.bp)
    # /chat/completions, /completions and /models answer like their /v1 twins, as llama.cpp's server does: a
    # client configured without /v1 just works.
    app.register_blueprint(openai_api.bp, url_prefix="", name="openai_unprefixed")
    app.register_blueprint(ollama_api.bp)
    app.register_blueprint(tokenize_api.bp)
    app.register_blueprint(page.bp)
    logging.getLogger(__name__).info("configuration from %s; model %s", settings["source"],
                                     settings["model"]["name"])
    return app
