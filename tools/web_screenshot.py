"""Take the README's screenshot of the web page: photos uploaded in headless Chromium, captioned.

Usage:
    python tools/web_screenshot.py --model models/ls-bleu --data-dir data \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --images ../shared/flickr8k/Flicker8k_Dataset --photos A.jpg B.jpg --output docs/web.png
    ... --results results/ --view results      # the results view instead

Starts the app (captioning/apps/webapp.py) on a free loopback port in this process, drives Debian's
Chromium (/usr/bin/chromium, /usr/bin/chromedriver) through Selenium, uploads --photos (caption
view) or opens the first results run (results view), waits for the answer and saves a PNG.
Reads what serve.py reads; writes --output only.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from captioning.utils import HelpFormatter, atomic_write, run_cli  # noqa: E402
from captioning.apps.web_captioner import WebCaptioner  # noqa: E402
from captioning.apps.webapp import create_app, running  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WINDOW = (1280, 900)     # CSS pixels of the screenshot


def chromium(profile_dir):
    from selenium import webdriver
    os.environ.setdefault("SE_OFFLINE", "true")     # Selenium Manager must not go online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="train.py run folder")
    parser.add_argument("--data-dir", default="data", help="prepare_text.py output folder")
    parser.add_argument("--weights", default="imagenet", help="VGG16 weights for new photos")
    parser.add_argument("--features", default=None, help="cached features.pkl of --images")
    parser.add_argument("--images", default=None, help="dataset image folder")
    parser.add_argument("--results", default=None, help="evaluate_bleu.py output folder")
    parser.add_argument("--photos", nargs="*", default=[], help="photos to upload")
    parser.add_argument("--beam", type=int, default=3, help="beam width chosen on the page")
    parser.add_argument("--view", choices=["caption", "results"], default="caption")
    parser.add_argument("--output", type=Path, default=Path("docs/web.png"))
    args = parser.parse_args(argv)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait
    captioner = WebCaptioner(args.model, args.data_dir, weights=args.weights, features=args.features,
                             images=args.images)
    app = create_app(captioner, results_dir=args.results, images_dir=args.images)
    with tempfile.TemporaryDirectory() as profile, running(app) as url:
        driver = chromium(profile)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model "))
            if args.view == "caption":
                Select(driver.find_element(By.ID, "beam")).select_by_value(str(args.beam))
                driver.find_element(By.ID, "files").send_keys("\n".join(str(Path(p).resolve())
                                                                       for p in args.photos))
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == len(args.photos))
            else:
                driver.find_element(By.CSS_SELECTOR, "[data-view=results]").click()
                wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".row img")))
            wait.until(lambda d: d.execute_script(      # the images in view (others load lazily)
                "return [...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                ".every(i => i.complete)"))
            png = driver.get_screenshot_as_png()
            with atomic_write(args.output, "wb") as handle:
                handle.write(png)
        finally:
            driver.quit()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
