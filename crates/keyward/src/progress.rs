//! Progress of long operations (`key import --batch`, `store copy`, `backup`, `restore`) on a
//! terminal. Quiet with `--json` and when stderr is not a terminal (pipes, CI logs).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    stage: String,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        let shown = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = shown.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{msg:>18} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress { bar, stage: String::new() }
    }

    /// `done` of `total` in `stage` (a table, "pages", "keys").
    pub fn update(&mut self, stage: &str, done: u64, total: u64) {
        let Some(bar) = &self.bar else { return };
        if stage != self.stage {
            self.stage = stage.to_string();
            bar.set_message(stage.to_string());
            bar.reset();
        }
        bar.set_length(total.max(done));
        bar.set_position(done);
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
