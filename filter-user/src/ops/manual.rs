//! The manual the package installs, generated from the CLI's own definition so it cannot
//! drift from it: one man page per visible command (section 8: commands for the
//! administrator) and shell completions for bash, zsh and fish.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use clap::Command;
use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("{path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Man pages go to `<dir>/man8/`, completions to `<dir>/completions/`. Returns the files
/// written.
pub fn write_all(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    let mut cmd = cmd;
    cmd.build();
    let mut written = write_pages(&cmd, &dir.join("man8"))?;
    written.extend(write_completions(&mut cmd, &dir.join("completions"))?);
    Ok(written)
}

/// `ewsgate.8`, then `ewsgate-block.8`, `ewsgate-block-add.8`, ... for every command that is
/// not hidden (the proxy's entry point and this generator are not for people), each titled
/// with the full command (`ewsgate block add`).
pub fn write_pages(cmd: &Command, dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    create_dir(dir)?;
    let mut written = Vec::new();
    let source = match cmd.get_version() {
        Some(v) => format!("{} {v}", cmd.get_name()),
        None => cmd.get_name().to_string(),
    };
    page(cmd, cmd.get_name().to_string(), &source, dir, &mut written)?;
    Ok(written)
}

fn page(
    cmd: &Command,
    name: String,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), ManualError> {
    let cmd = cmd
        .clone()
        .display_name(name.clone())
        .bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.8"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("ewsgate")
        .source(source.to_string())
        .render(&mut out)
        .map_err(|e| write_error(&path, e))?;
    fs::write(&path, out).map_err(|e| write_error(&path, e))?;
    written.push(path);
    // clap's generated `help` commands would only repeat the pages.
    let shown = |s: &&Command| !s.is_hide_set() && s.get_name() != "help";
    for sub in cmd.get_subcommands().filter(shown) {
        page(
            sub,
            format!("{name}-{}", sub.get_name()),
            source,
            dir,
            written,
        )?;
    }
    Ok(())
}

/// Completions as bash-completion, zsh and fish name their files. clap_complete offers
/// hidden commands too (`proxy`, `manual`); clap has no way to take them out of a built
/// command.
pub fn write_completions(cmd: &mut Command, dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    create_dir(dir)?;
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, name.clone()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = dir.join(file);
        let mut out = Vec::new();
        clap_complete::generate(shell, cmd, name.clone(), &mut out);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(&out))
            .map_err(|e| write_error(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

fn create_dir(dir: &Path) -> Result<(), ManualError> {
    fs::create_dir_all(dir).map_err(|e| write_error(dir, e))
}

fn write_error(path: &Path, source: io::Error) -> ManualError {
    ManualError::Write {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("gate")
            .about("a gate")
            .subcommand(
                Command::new("block")
                    .about("blocks")
                    .subcommand(Command::new("add").about("adds")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_command_and_three_completions() {
        let dir = std::env::temp_dir().join(format!("ewsgate-manual-{}", std::process::id()));
        let written = write_all(cli(), &dir).expect("written");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "gate.8",
                "gate-block.8",
                "gate-block-add.8",
                "gate",
                "_gate",
                "gate.fish"
            ]
        );
        let top = fs::read_to_string(dir.join("man8/gate.8")).unwrap();
        assert!(top.contains(".TH gate 8"), "{top}");
        assert!(!top.contains("secret"), "hidden commands stay out: {top}");
        let sub = fs::read_to_string(dir.join("man8/gate-block-add.8")).unwrap();
        assert!(sub.contains("gate block add"), "{sub}");
        let bash = fs::read_to_string(dir.join("completions/gate")).unwrap();
        assert!(bash.contains("block") && bash.contains("add"), "{bash}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
